"""`train --autocast bf16`: the frozen model's matmuls run in bf16 under CPU autocast while the prefix (the
master weights) stays float32, and the result stays close to the float32 run."""

from __future__ import annotations

import math

import torch

from prefixtune.prefix.peft_io import load_adapter
from prefixtune.train.config import TrainConfig
from prefixtune.train.run import train


def _cfg(tmp_path, model_dir, data, name, **kw):
    return TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path / name), max_examples=48,
                       eval_examples=16, max_steps=4, eval_every=0, batch_size=8, num_virtual_tokens=4, lr=1e-2,
                       progress=False, device="cpu", dtype="float32", seed=0, **kw)


def test_bf16_autocast_trains_float32_prefixes_close_to_float32(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    seen = []
    proj = tiny_lm.model.model.layers[0].mlp.down_proj
    handle = proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if torch.is_grad_enabled() else None)
    try:
        mixed = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, "bf16", autocast="bf16"), loaded=tiny_lm)
        n = len(seen)
        plain = train(_cfg(tmp_path, tiny_model_dir, emotion_dir, "fp32"), loaded=tiny_lm)
    finally:
        handle.remove()
    assert n and set(seen[:n]) == {torch.bfloat16}  # the frozen model's matmuls ran in bf16 while training
    assert set(seen[n:]) == {torch.float32}  # and not without the option
    flat = load_adapter(mixed.adapters["emotion"]).flat
    assert flat.dtype == torch.float32 and torch.isfinite(flat).all()
    a, b = mixed.summary["best eval loss"], plain.summary["best eval loss"]
    assert math.isfinite(a) and abs(a - b) < 0.05, (a, b)


def test_unknown_autocast_is_refused(tmp_path, tiny_model_dir, emotion_dir):
    import pytest

    from prefixtune.train.config import check_settings

    with pytest.raises(ValueError, match="--autocast 'fp8': use off or bf16"):
        check_settings(_cfg(tmp_path, tiny_model_dir, emotion_dir, "x", autocast="fp8"))
