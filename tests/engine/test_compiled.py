"""The compiled decode step (engine/compiled.py) gives the eager step's greedy tokens, on a model whose attention
is sharp enough that a wrong key/value column changes them; a compiler failure falls back to eager once."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from prefixtune.engine.compiled import CompiledDecode, batch_buckets, compile_decode, width_bucket
from prefixtune.engine.lm import PrefixLM
from prefixtune.engine.runner import ModelRunner
from prefixtune.models import LoadedModel
from prefixtune.testing import make_tiny_model, make_tiny_tokenizer, write_random_store

PROMPTS = ["The weather today is", "Once upon a time, in a land far away,", "Hi", "Emotion: joy\nText: i feel"]
ADAPTERS = ["a", "b", None, "a", "b"]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A sharp tiny llama with two adapters of different lengths in a store."""
    model = make_tiny_model("llama", sharp=True)
    loaded = LoadedModel(model=model, tokenizer=make_tiny_tokenizer(), name="tiny-sharp", path="tiny-sharp",
                         device=torch.device("cpu"), dtype=torch.float32, fingerprint="tiny-sharp")
    adapters = {"a": {"tokens": 5, "seed": 1}, "b": {"tokens": 11, "seed": 2}}
    return loaded, write_random_store(tmp_path_factory.mktemp("store"), loaded, adapters)


def _generate(lm: PrefixLM, n: int = 12) -> list[list[int]]:
    prompts = PROMPTS + ["A longer prompt, so that the rows of this batch have different widths to attend over"]
    return [g.tokens for g in lm.generate(prompts, ADAPTERS, max_new_tokens=n)]


def test_buckets():
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20] and batch_buckets(1) == [1] and batch_buckets(4) == [1, 2, 4]
    assert [width_bucket(w) for w in (1, 64, 65, 300)] == [64, 64, 128, 512]
    model = make_tiny_model("llama")
    static = CompiledDecode(model, 8, buckets=True)
    assert static.shape(3, 70) == (4, 128) and static.shape(8, 1) == (8, 64) and static.shape(11, 1) == (11, 64)
    assert CompiledDecode(model, 8).shape(3, 70) == (3, 70)  # symbolic sizes on a CPU: nothing padded


def test_compiled_greedy_equals_eager(sharp):
    loaded, store = sharp
    eager = _generate(PrefixLM(loaded, store))
    lm = PrefixLM(loaded, store)
    messages = []
    before = counters["stats"]["unique_graphs"]
    step = compile_decode(lm, 8, say=messages.append)
    assert counters["stats"]["unique_graphs"] > before  # warm-up compiled (the counter below means something)
    assert step.failed is None and lm.compiled_decode is step and step.compile_s > 0
    assert any("compiled the decode step" in m for m in messages)
    calls = []
    original = step._fn
    step._fn = lambda **kw: calls.append(kw["input_ids"].shape) or original(**kw)
    graphs = counters["stats"]["unique_graphs"]
    assert _generate(lm) == eager
    assert calls, "the compiled step never ran"
    # Warm-up compiled every graph this batch needs (rows leave one by one down to 1): no step compiles.
    assert counters["stats"]["unique_graphs"] == graphs
    assert len({tuple(g) for g in eager}) > 2  # the adapters matter, so equality is not trivial


@pytest.mark.slow
def test_bucketed_static_step_equals_eager(sharp):
    """The CUDA-graph layout (rows padded to a bucket, width to a power of two) on the CPU: padded rows must not
    disturb the real ones."""
    loaded, store = sharp
    eager = _generate(PrefixLM(loaded, store), n=6)
    lm = PrefixLM(loaded, store)
    step = CompiledDecode(loaded.model, 8, buckets=True)
    step.warm_up(lambda: ModelRunner(loaded.model, 8), rows=[8])
    lm.compiled_decode = step
    shapes = []
    original = step._fn
    step._fn = lambda **kw: shapes.append(tuple(kw["attention_mask"].shape)) or original(**kw)
    assert _generate(lm, n=6) == eager
    assert shapes and all(s[0] == 8 and s[-1] == 64 for s in shapes)  # 5 rows ran as 8, width as 64


def test_compile_failure_falls_back_to_eager_with_one_message(sharp):
    loaded, store = sharp
    eager = _generate(PrefixLM(loaded, store))
    lm = PrefixLM(loaded, store)
    messages = []
    step = CompiledDecode(loaded.model, 8, say=messages.append)

    def broken(**_):
        raise RuntimeError("inductor: no C++ compiler found\nlong trace")

    step._fn = broken
    lm.compiled_decode = step
    assert _generate(lm) == eager
    assert step.failed == "RuntimeError: inductor: no C++ compiler found"
    assert len(messages) == 1 and "decoding eagerly" in messages[0] and "--compile" in messages[0]
