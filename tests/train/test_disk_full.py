"""A full disk (ENOSPC, simulated) while a checkpoint, a LoRA adapter or the store publish is written (issue
#24): the previous checkpoint and the store stay valid, the error says what failed and how to go on, and
--resume finishes the run with nothing lost (its adapters equal an uninterrupted run's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fault_injection import fill_disk_after
from peft import peft_model
from safetensors.torch import load_file

from prefixtune.adapter_folder import StoreError
from prefixtune.prefix.peft_io import load_adapter
from prefixtune.store import AdapterStore
from prefixtune.train import checkpoint
from prefixtune.train.checkpoint import CheckpointError
from prefixtune.train.config import TrainConfig
from prefixtune.train.run import train


def _cfg(tmp_path: Path, model_dir, data, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_examples=32, eval_examples=8,
                max_steps=4, eval_every=0, save_every=2, batch_size=8, num_virtual_tokens=2, lr=1e-2,
                progress=False, device="cpu", dtype="float32", name="emo")
    base.update(kw)
    return TrainConfig(**base)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, tiny_lm, emotion_dir) -> torch.Tensor:
    out = tmp_path_factory.mktemp("whole")
    return load_adapter(train(_cfg(out, tiny_model_dir, emotion_dir), loaded=tiny_lm).out / "last" / "emo").flat


def test_disk_full_during_a_checkpoint(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch, uninterrupted):
    fill_disk_after(monkeypatch, checkpoint.torch, "save", calls_ok=1)  # step 2 saved, step 4 half-written
    with pytest.raises(CheckpointError) as caught:
        train(_cfg(tmp_path, tiny_model_dir, emotion_dir), loaded=tiny_lm)
    message = str(caught.value)
    assert f"cannot write a checkpoint into {tmp_path / 'run'}" in message
    assert "No space left on device (ENOSPC); free space" in message
    assert "the last good checkpoint (step 2) is kept: then rerun with --resume" in message
    run = tmp_path / "run"
    assert json.loads((run / "checkpoint" / "progress.json").read_text())["step"] == 2
    torch.load(run / "checkpoint" / "state.pt", weights_only=True)  # whole, not the half-written one
    assert not list(run.glob(".checkpoint.*")), "the failed attempt is cleaned up"
    assert not (run / "last").exists()
    monkeypatch.undo()
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, resume=True), loaded=tiny_lm)
    torch.testing.assert_close(load_adapter(result.out / "last" / "emo").flat, uninterrupted)


def test_disk_full_while_publishing_to_the_store(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch,
                                                 uninterrupted):
    store = tmp_path / "store"
    older = train(_cfg(tmp_path / "older", tiny_model_dir, emotion_dir, max_steps=1, save_every=0),
                  loaded=tiny_lm).out / "last" / "emo"
    AdapterStore(store).put("emo", older)
    before = _tree(store)
    fill_disk_after(monkeypatch, shutil, "copyfile", calls_ok=1)  # the publish is the run's only file copy
    with pytest.raises(StoreError) as caught:
        train(_cfg(tmp_path, tiny_model_dir, emotion_dir, store=str(store)), loaded=tiny_lm)
    message = str(caught.value)
    assert f"cannot publish adapters emo into the store {store}" in message
    assert "No space left on device (ENOSPC); free space" in message
    assert f"the checkpoint in {tmp_path / 'run' / 'checkpoint'} (step 4) is kept" in message
    assert f"continue with: prefixtune train --config {tmp_path / 'run' / 'run.json'} --resume" in message
    assert _tree(store) == before, "the store still holds exactly the older adapter"
    monkeypatch.undo()
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, store=str(store), resume=True), loaded=tiny_lm)
    torch.testing.assert_close(load_adapter(store / "emo").flat, uninterrupted)
    assert result.adapters["emo"] == store / "emo"


def test_disk_full_while_a_lora_adapter_is_saved(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch):
    def cfg(out: Path, **kw) -> TrainConfig:
        return _cfg(out, tiny_model_dir, emotion_dir, method="lora", name="lora", **kw)

    whole = train(cfg(tmp_path / "whole"), loaded=tiny_lm).out / "last" / "lora" / "adapter_model.safetensors"
    fill_disk_after(monkeypatch, peft_model, "safe_save_file", calls_ok=0)  # PEFT's save_pretrained
    with pytest.raises(StoreError) as caught:
        train(cfg(tmp_path), loaded=tiny_lm)
    run = tmp_path / "run"
    message = str(caught.value)
    assert f"cannot write the adapter folder {run / 'best' / 'lora'}" in message  # the final eval's best
    assert "No space left on device (ENOSPC); free space" in message
    step = checkpoint.checkpoint_step(run)  # the last one before the eval whose best/ save failed
    assert step is not None and f"the checkpoint in {run / 'checkpoint'} (step {step}) is kept" in message, message
    assert f"continue with: prefixtune train --config {run / 'run.json'} --resume" in message
    assert not (run / "best" / "lora").exists() and not list((run / "best").glob(".*")), "no half-written folder"
    monkeypatch.undo()
    result = train(cfg(tmp_path, resume=True), loaded=tiny_lm)
    resumed = load_file(result.out / "last" / "lora" / "adapter_model.safetensors")
    for name, tensor in load_file(whole).items():
        torch.testing.assert_close(resumed[name], tensor)



def test_disk_full_while_the_training_log_is_written(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch,
                                                     uninterrupted):
    from prefixtune.train import report
    from prefixtune.train.report import LogWriteError

    real, calls = report.atomic_write_text, []

    def full_on_second(path, text):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(report, "atomic_write_text", full_on_second)  # the eval at step 2 logs, step 4 fails
    with pytest.raises(LogWriteError) as caught:
        train(_cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=2), loaded=tiny_lm)
    message = str(caught.value)
    run = tmp_path / "run"
    assert f"cannot write the training log {run / 'train_log.jsonl'}" in message
    assert "No space left on device (ENOSPC); free space" in message
    assert f"continue with: prefixtune train --config {run / 'run.json'} --resume" in message
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()][-1] == 2
    monkeypatch.undo()
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=2, resume=True), loaded=tiny_lm)
    assert json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 4
    torch.testing.assert_close(load_adapter(result.out / "last" / "emo").flat, uninterrupted)  # evals draw nothing
