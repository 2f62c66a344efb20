"""Training on a tiny model: both modes, plain text, resume, OOM back-off, loss check, clear errors."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from prefixtune.adapter_folder import read_manifest
from prefixtune.data import load_data
from prefixtune.prefix.peft_io import load_adapter
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.train.config import TrainConfig
from prefixtune.train.examples import tokenize
from prefixtune.train.loop import Trainer
from prefixtune.train.run import train


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_examples=48,
                eval_examples=16, max_steps=4, eval_every=2, batch_size=8, num_virtual_tokens=4,
                lr=1e-2, progress=False, device="cpu", dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def test_label_in_prompt_adapter_describes_itself(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir), loaded=tiny_lm)
    assert list(result.adapters) == ["emotion"]
    folder = result.adapters["emotion"]
    assert {"adapter_config.json", "adapter_model.safetensors", "prefix_trainable.safetensors",
            "prefixtune.json"} <= {p.name for p in folder.iterdir()}
    manifest = read_manifest(folder)
    assert manifest.base_fingerprint == tiny_lm.fingerprint
    assert manifest.template == "Emotion: {label}\nText:"
    assert set(manifest.labels) == {"sadness", "joy", "love", "anger", "fear", "surprise"}
    assert manifest.hyperparams["lr"] == 1e-2 and manifest.metrics["eval_loss"] > 0
    assert manifest.versions["torch"] == torch.__version__
    run = result.out
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert result.summary["trainable params"] > 0 and result.summary["adapter file bytes"] > 0
    load_adapter(folder, prefix_shape(tiny_lm.model.config))


def test_per_label_adapters_train_together(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, per_label=True, labels=["joy", "anger"], balance=True,
               store=str(tmp_path / "store"))
    result = train(cfg, loaded=tiny_lm)
    assert sorted(result.adapters) == ["emotion-anger", "emotion-joy"]
    for name, label in (("emotion-anger", "anger"), ("emotion-joy", "joy")):
        manifest = read_manifest(tmp_path / "store" / name)
        assert manifest.label == label and manifest.template == "Text:"
    # Each adapter trained: its weights moved away from a fresh encoder's in one shared pass.
    a = load_file(str(tmp_path / "store" / "emotion-joy" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "store" / "emotion-anger" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert not torch.allclose(a, b)


def test_plain_text_data(tmp_path, tiny_model_dir, tiny_lm):
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(f"line number {i} of plain text" for i in range(30)))
    result = train(_cfg(tmp_path, tiny_model_dir, data, name="notes"), loaded=tiny_lm)
    assert read_manifest(result.adapters["notes"]).template == ""


def test_prompt_and_text_tokenized_together(tiny_lm, emotion_dir):
    examples = load_data(str(emotion_dir), max_examples=5).split("train")
    rows, _ = tokenize(examples, tiny_lm.tokenizer, "Emotion: {label}\nText:", lambda ex: "a", 64)
    for ex, row in zip(examples, rows):
        full = tiny_lm.tokenizer(f"Emotion: {ex.label}\nText: {ex.text}").input_ids
        assert row.input_ids == full + [tiny_lm.tokenizer.eos_token_id]
        prompt_ids = tiny_lm.tokenizer(f"Emotion: {ex.label}\nText:").input_ids
        assert row.input_ids[: row.prompt_len] == prompt_ids


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch):
    straight = train(_cfg(tmp_path / "a", tiny_model_dir, emotion_dir, max_steps=6, save_every=2), loaded=tiny_lm)
    original_step = Trainer.step

    def step_then_sigint(self, batch):
        out = original_step(self, batch)
        if self.progress.step == 2:  # the step counter is bumped after this returns: interrupt after step 3
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_sigint)
    cfg = _cfg(tmp_path / "b", tiny_model_dir, emotion_dir, max_steps=6, save_every=100)
    first = train(cfg, loaded=tiny_lm)
    assert first.interrupted
    monkeypatch.setattr(Trainer, "step", original_step)
    cfg.resume = True
    resumed = train(cfg, loaded=tiny_lm)
    assert not resumed.interrupted and resumed.summary["steps"] == 6
    log = [json.loads(x) for x in (resumed.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    same = load_adapter(straight.out / "last" / "emotion").flat
    torch.testing.assert_close(load_adapter(resumed.out / "last" / "emotion").flat, same)


def test_oom_halves_the_micro_batch(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch):
    from prefixtune.prefix.model import PrefixModel

    original = PrefixModel.forward

    def small_memory(self, input_ids, *args, **kwargs):
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(PrefixModel, "forward", small_memory)
    said = []
    # Eval runs at twice the micro-batch (no activations kept): 4 rows here, which also OOM and halve.
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, eval_every=0, eval_examples=6, batch_size=8),
                   loaded=tiny_lm, say=said.append)
    assert result.summary["steps"] == 4
    assert math.isfinite(result.summary["best eval loss"])
    assert any("out of memory at micro-batch 8: continuing with micro-batch 4 x 2" in s for s in said)
    assert any("micro-batch 2 x 4 accumulation steps" in s for s in said)


def test_flat_loss_warns_with_causes(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, lr=0.0, max_steps=20, loss_check_steps=20, eval_every=0,
               max_examples=160)
    result = train(cfg, loaded=tiny_lm)
    assert any("has not fallen after 20 steps" in w and "--lr" in w for w in result.warnings)


def test_too_long_examples_are_truncated_and_counted(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, max_length=8, max_steps=1), loaded=tiny_lm)
    assert result.summary["truncated examples"] > 0


def test_bf16_base_with_fp32_prefix(tmp_path, tiny_model_dir, emotion_dir):
    from prefixtune.models import load_base_model

    loaded = load_base_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    result = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, dtype="bfloat16", max_steps=2), loaded=loaded)
    assert result.summary["best eval loss"] == result.summary["best eval loss"]  # not NaN


def test_per_label_on_unlabelled_data_is_refused(tmp_path, tiny_model_dir, tiny_lm):
    from prefixtune.data import DataError

    data = tmp_path / "plain.txt"
    data.write_text("one line\nanother line\n")
    with pytest.raises(DataError, match="--per-label needs labelled data"):
        train(_cfg(tmp_path, tiny_model_dir, data, per_label=True), loaded=tiny_lm)


def test_bad_adapter_name_fails_before_training(tmp_path, tiny_model_dir, tiny_lm):
    from prefixtune.data import DataError

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "so glad", "label": "very happy"}\n{"text": "so sad", "label": "sad"}\n')
    with pytest.raises(DataError, match="invalid adapter name 'emotion-very happy'"):
        train(_cfg(tmp_path, tiny_model_dir, data, per_label=True), loaded=tiny_lm)
    assert not (tmp_path / "run").exists()


def test_init_from_continues_through_the_saved_mlp(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    first = train(_cfg(tmp_path / "a", tiny_model_dir, emotion_dir, max_steps=2), loaded=tiny_lm)
    folder = first.adapters["emotion"]
    said = []
    cfg = _cfg(tmp_path / "b", tiny_model_dir, emotion_dir, max_steps=1, lr=0.0, init_from=str(folder))
    second = train(cfg, loaded=tiny_lm, say=said.append)
    assert any("embedding + MLP" in s for s in said)
    # lr 0: the continued adapter is exactly the one it started from, MLP and all
    torch.testing.assert_close(load_adapter(second.adapters["emotion"]).flat, load_adapter(folder).flat)
    wrong = _cfg(tmp_path / "c", tiny_model_dir, emotion_dir, num_virtual_tokens=7, init_from=str(folder))
    with pytest.raises(ValueError, match="--num-virtual-tokens 4"):
        train(wrong, loaded=tiny_lm)


def test_held_out_rows_are_a_sample_not_the_head(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    from prefixtune.train.plan import plan_run

    rows = sorted(load_data(str(emotion_dir)).split("train")[:400], key=lambda ex: ex.label)
    data = tmp_path / "sorted.jsonl"
    data.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in rows))
    plan = plan_run(_cfg(tmp_path, tiny_model_dir, data, per_label=True, max_examples=None, eval_examples=20),
                    loaded=tiny_lm, say=lambda *_: None)
    assert len({row.adapter for row in plan.val_rows}) > 1


def test_short_loss_check_window_still_warns(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, lr=0.0, max_steps=6, loss_check_steps=6, eval_every=0)
    assert any("has not fallen after 6 steps" in w for w in train(cfg, loaded=tiny_lm).warnings)


def test_fewer_rows_per_step_than_processes_is_refused(tmp_path, tiny_model_dir, tiny_lm, emotion_dir, monkeypatch):
    from accelerate import Accelerator

    from prefixtune.train.config import ConfigError

    # DDP splits each step's --batch-size rows over the processes: every process needs at least one.
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ConfigError, match="fewer than the 2 processes"):
        train(_cfg(tmp_path, tiny_model_dir, emotion_dir, max_examples=6, batch_size=1), loaded=tiny_lm)
