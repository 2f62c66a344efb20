"""On a CUDA GPU (skipped elsewhere; scripts/gpu_check.sh runs them): bf16 numerics against float32 references,
the CUDA-graph decode step against eager, and the training loop's OOM back-off on a real out-of-memory."""

from __future__ import annotations

import math

import pytest
import torch

from prefixtune.engine.compiled import compile_decode
from prefixtune.engine.lm import PrefixLM
from prefixtune.models import load_base_model
from prefixtune.testing import write_random_adapter

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

PROMPTS = ["The weather today is", "Once upon a time, in a land far away,", "Hi", "Emotion: joy\nText: i feel"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("store")
    loaded = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    write_random_adapter(root, "a", loaded, tokens=5, seed=1)
    write_random_adapter(root, "b", loaded, tokens=9, seed=2)
    return root


def _lm(tiny_model_dir, store, dtype):
    return PrefixLM(load_base_model(str(tiny_model_dir), device="cuda", dtype=dtype), store)


def test_bf16_prefill_logits_match_float32(tiny_model_dir, store):
    """The engine's bf16 logits stay within bf16's resolution of a float32 reference on the same GPU."""
    ref, half = _lm(tiny_model_dir, store, "float32"), _lm(tiny_model_dir, store, "bfloat16")
    ids = ref.tokenizer(PROMPTS[1], return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        a = ref.model(input_ids=ids).logits.float()
        b = half.model(input_ids=ids).logits.float()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item() + 0.05
    agree = [x.tokens == y.tokens for x, y in zip(ref.generate(PROMPTS, ["a", "b", None, "a"], max_new_tokens=6),
                                                  half.generate(PROMPTS, ["a", "b", None, "a"], max_new_tokens=6))]
    assert sum(agree) >= 2, agree  # bf16 ties may flip a random tiny model's near-flat choices, not most rows


def test_cuda_graph_decode_equals_eager(tiny_model_dir, store):
    lm = _lm(tiny_model_dir, store, "float32")
    eager = [g.tokens for g in lm.generate(PROMPTS, ["a", "b", None, "a"], max_new_tokens=10)]
    step = compile_decode(lm, 8, say=lambda m: None)
    assert step.failed is None and step.buckets
    assert [g.tokens for g in lm.generate(PROMPTS, ["a", "b", None, "a"], max_new_tokens=10)] == eager


def test_training_backs_off_on_a_real_out_of_memory(tmp_path, tiny_model_dir, emotion_dir):
    """Cap this process's GPU memory so a 64-row micro-batch cannot fit; the loop must halve and finish."""
    from prefixtune.train.config import TrainConfig
    from prefixtune.train.run import train

    free, total = torch.cuda.mem_get_info()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 1.5e9 / total))
    try:
        said = []
        cfg = TrainConfig(model=str(tiny_model_dir), data=str(emotion_dir), out=str(tmp_path / "run"),
                          max_examples=256, eval_examples=16, max_steps=2, eval_every=0, batch_size=256,
                          micro_batch_size=256, max_length=1024, num_virtual_tokens=4, progress=False,
                          device="cuda", dtype="float32")
        result = train(cfg, say=said.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert result.summary["steps"] == 2 and math.isfinite(result.summary["best eval loss"])
    assert any("out of memory" in s for s in said), said
