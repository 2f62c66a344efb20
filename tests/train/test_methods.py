"""One engine, pluggable methods: LoRA runs through the same loop as prefix tuning (OOM back-off, checkpoints,
resume, evals), and `compare` builds its TrainConfigs from the same settings `train` uses."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file

from prefixtune.prefix.model import PrefixModel
from prefixtune.train.config import TrainConfig
from prefixtune.train.loop import Trainer
from prefixtune.train.run import train


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_examples=32,
                eval_examples=8, max_steps=4, eval_every=2, batch_size=8, lr=1e-2, progress=False,
                device="cpu", dtype="float32", method="lora", name="lora", save_every=2)
    base.update(kw)
    return TrainConfig(**base)


def _lora_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_trains_in_the_shared_loop_and_gives_the_base_back(tmp_path, tiny_model_dir, tiny_lm, emotion_dir,
                                                                monkeypatch):
    names_before = sorted(n for n, _ in tiny_lm.model.named_parameters())
    original = PrefixModel.forward

    def small_memory(self, input_ids, *args, **kwargs):  # the loop's OOM back-off serves LoRA too
        if input_ids.shape[0] > 4 and torch.is_grad_enabled():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(PrefixModel, "forward", small_memory)
    said = []
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir), loaded=tiny_lm, say=said.append)
    folder = result.adapters["lora"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert any("continuing with micro-batch 4 x 2" in s for s in said)
    assert result.summary["trainable params"] == 7168 and result.summary["best eval loss"] > 0
    log = [json.loads(x) for x in (result.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [2, 4]
    assert (result.out / "checkpoint" / "state.pt").is_file() and (result.out / "best" / "lora").is_dir()
    assert sorted(n for n, _ in tiny_lm.model.named_parameters()) == names_before, "LoRA layers removed"
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_lora_resume_matches_uninterrupted(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch):
    straight = train(_cfg(tmp_path / "a", tiny_model_dir, emotion_dir), loaded=tiny_lm)
    original = Trainer.step

    def step_then_sigint(self, batch):
        out = original(self, batch)
        if self.progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_sigint)
    cfg = _cfg(tmp_path / "b", tiny_model_dir, emotion_dir, save_every=100)
    assert train(cfg, loaded=tiny_lm).interrupted
    monkeypatch.setattr(Trainer, "step", original)
    cfg.resume = True
    resumed = train(cfg, loaded=tiny_lm)
    a, b = _lora_weights(straight.out / "last" / "lora"), _lora_weights(resumed.out / "last" / "lora")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_lora_with_a_store_is_refused(tmp_path, tiny_model_dir, emotion_dir):
    from prefixtune.train.config import ConfigError

    with pytest.raises(ConfigError, match="drop --store"):
        train(_cfg(tmp_path, tiny_model_dir, emotion_dir, store=str(tmp_path / "store")))


def test_compare_gives_the_prefix_the_train_recipe():
    from prefixtune.eval.compare import CompareConfig

    cmp = CompareConfig(init="text", init_text="i feel {label}", encoder_hidden_size=32, prefix_projection=False,
                        num_virtual_tokens=7, max_length=64, lr=1e-3, prefix_lr=5e-3, lora_r=4, steps=9, seed=3)
    prefix, lora = cmp.train_config("prefix"), cmp.train_config("lora")
    assert (prefix.init, prefix.init_text, prefix.encoder_hidden_size, prefix.prefix_projection) == (
        "text", "i feel {label}", 32, False)
    assert prefix.method == "prefix" and lora.method == "lora" and lora.lora_r == 4
    assert (prefix.lr, lora.lr, prefix.max_steps, prefix.seed, prefix.max_length) == (5e-3, 1e-3, 9, 3, 64)
    # Every recipe setting compare has is carried over by name; none is copied by hand (and so none dropped).
    shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(CompareConfig)}
    overridden = {"out", "lr", "per_label", "eval_examples"}
    for name in shared - overridden:
        assert getattr(prefix, name) == getattr(cmp, name), name


def test_full_fine_tuning_gives_a_shared_model_back(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, method="full", name="full", lr=1e-3)
    if sys.platform == "linux":  # memory earlier tests in this worker freed but glibc kept resident would hold
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # training's tensors without raising the RSS measured below
    result = train(cfg, loaded=tiny_lm, say=lambda *a: None)
    assert result.summary["trainable params"] == sum(p.numel() for p in before.values())
    assert (result.adapters["full"] / "model.safetensors").is_file() and result.summary["trainable %"] == 100.0
    assert result.summary["memory added MB"] >= 3 * 4 * result.summary["trainable params"] / 2**20  # grads + AdamW
    for name, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, before[name]) and not p.requires_grad, name
