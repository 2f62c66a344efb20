"""All-or-nothing runs: checks before the model loads, OUT refused or replaced, the store published only by a
run that completed, best/ always this run's, checkpoints without pickle."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from prefixtune.prefix.peft_io import load_adapter
from prefixtune.train.checkpoint import CheckpointError
from prefixtune.train.config import ConfigError, TrainConfig
from prefixtune.train.loop import Trainer
from prefixtune.train.run import train


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_examples=32,
                eval_examples=8, max_steps=2, eval_every=1, batch_size=8, num_virtual_tokens=2,
                lr=1e-2, progress=False, device="cpu", dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def _flat(folder: Path) -> torch.Tensor:
    return load_adapter(folder).flat


def _no_load(*_a, **_k):
    raise AssertionError("the model must not load when a check fails")


@pytest.mark.parametrize("setting, message", [
    ({"storage_dtype": "fp8"}, "--storage-dtype 'fp8'"),
    ({"name": "a/b"}, "--name: invalid adapter name"),
    ({"init": "text"}, "--init text needs --init-text"),
    ({"num_virtual_tokens": 0}, "--num-virtual-tokens must be a whole number >= 1"),
    ({"num_virtual_tokens": 10**6}, "is absurd"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"warmup_ratio": 1.5}, "--warmup-ratio"),
    ({"method": "adapters"}, "--method 'adapters'"),
    ({"method": "lora", "per_label": True}, "--per-label is prefix-only"),
    ({"device": "tpu"}, "unknown device"),
    ({"resume": True, "overwrite": True}, "pick one"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, setting, message, monkeypatch):
    import prefixtune.models

    monkeypatch.setattr(prefixtune.models, "load_base_model", _no_load)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        train(TrainConfig(out=str(tmp_path / "run"), **setting))
    assert not (tmp_path / "run").exists()


def test_storage_dtype_aliases_save(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, storage_dtype="fp16", max_steps=1), loaded=tiny_lm)
    from safetensors.torch import load_file

    tensor = load_file(str(result.adapters["emotion"] / "adapter_model.safetensors"))["prompt_embeddings"]
    assert tensor.dtype == torch.float16


def test_unwritable_store_and_non_empty_out_are_refused_up_front(tmp_path, monkeypatch):
    import prefixtune.models

    monkeypatch.setattr(prefixtune.models, "load_base_model", _no_load)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--store .* is not writable"):
        train(TrainConfig(out=str(tmp_path / "run"), store=str(tmp_path / "file" / "store")))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_log.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds files .* --resume .* --overwrite"):
        train(TrainConfig(out=str(tmp_path / "old")))
    with pytest.raises(ConfigError, match="holds files but no run to continue"):
        train(TrainConfig(out=str(tmp_path / "old"), resume=True))


def test_best_is_always_this_runs(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    store = tmp_path / "store"
    first = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, store=str(store)), loaded=tiny_lm)
    assert (first.out / "best" / "emotion").is_dir()
    # --eval-examples 0: no eval, so no best; the result (and the store) must be this run's last adapter.
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, store=str(store), eval_examples=0, seed=5, overwrite=True)
    second = train(cfg, loaded=tiny_lm)
    assert not (second.out / "best").exists(), "--overwrite cleared the previous run's best/"
    assert second.adapters["emotion"] == store / "emotion"
    torch.testing.assert_close(_flat(store / "emotion"), _flat(second.out / "last" / "emotion"))
    assert json.loads((second.out / "run.json").read_text())["seed"] == 5


def _interrupt_after(monkeypatch, step: int):
    original = Trainer.step

    def step_then_sigint(self, batch):
        out = original(self, batch)
        if self.progress.step == step - 1:  # the counter is bumped after this returns
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_sigint)
    return original


def test_interrupted_run_leaves_the_store_untouched(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch):
    store = tmp_path / "store"
    good = train(_cfg(tmp_path / "a", tiny_model_dir, emotion_dir, store=str(store)), loaded=tiny_lm)
    before = (store / "emotion" / "adapter_model.safetensors").read_bytes()
    original = _interrupt_after(monkeypatch, 2)
    said = []
    cfg = _cfg(tmp_path / "b", tiny_model_dir, emotion_dir, store=str(store), max_steps=4, seed=3)
    stopped = train(cfg, loaded=tiny_lm, say=said.append)
    assert stopped.interrupted and stopped.adapters == {}
    assert (store / "emotion" / "adapter_model.safetensors").read_bytes() == before, "store untouched"
    assert not (stopped.out / "last").exists()
    assert any("is untouched" in s and "--resume" in s and "run.json" in s for s in said)
    monkeypatch.setattr(Trainer, "step", original)
    cfg.resume = True
    done = train(cfg, loaded=tiny_lm)
    assert done.summary["steps"] == 4 and good.adapters["emotion"] == done.adapters["emotion"]
    assert (store / "emotion" / "adapter_model.safetensors").read_bytes() != before, "published on completion"


def test_checkpoint_is_read_without_pickle(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=0), loaded=tiny_lm)
    state = torch.load(result.out / "checkpoint" / "state.pt", weights_only=True)  # plain tensors/containers
    assert set(state) == {"trainable", "optimizer", "scheduler", "rng"}
    torch.save({"trainable": {}, "evil": Path("x")}, result.out / "checkpoint" / "state.pt")  # needs pickle
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=0, resume=True, max_steps=3)
    with pytest.raises(CheckpointError, match="unreadable .* --overwrite"):
        train(cfg, loaded=tiny_lm)


def test_unwritable_checkpoint_keeps_the_last_good_one(tmp_path, tiny_model_dir, tiny_lm, emotion_dir,
                                                       monkeypatch):
    from prefixtune.train import checkpoint

    real_save = torch.save
    calls = []

    def disk_turns_read_only(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", disk_turns_read_only)
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=0, save_every=2, max_steps=4)
    with pytest.raises(CheckpointError, match=r"Permission denied.*last good checkpoint \(step 2\) is kept"):
        train(cfg, loaded=tiny_lm)
    assert json.loads((tmp_path / "run" / "checkpoint" / "progress.json").read_text())["step"] == 2
    assert not list((tmp_path / "run").glob(".checkpoint.tmp-*")), "the failed attempt is cleaned up"


def test_resume_after_a_cut_checkpoint_swap(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    from prefixtune.train.checkpoint import recover_checkpoint

    run = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=0), loaded=tiny_lm).out
    # A kill between "move the old one aside" and "rename the new one in" leaves no checkpoint/ folder.
    os.rename(run / "checkpoint", run / ".checkpoint.old-1-1")
    recover_checkpoint(run)
    assert json.loads((run / "checkpoint" / "progress.json").read_text())["step"] == 2
