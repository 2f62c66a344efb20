"""`--quantize` on the real tiny model: which layers each mode replaces, the tokens it then generates (through
PrefixLM.load and the engine, with a prefix adapter), and the errors for what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import prefixtune.quantize as quantize
from prefixtune.engine.lm import PrefixLM
from prefixtune.quantize import QuantizeError, check_quantize, quantize_model
from prefixtune.testing import make_tiny_model, write_random_adapter

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("store")
    write_random_adapter(root, "a", tiny_lm, tokens=4, seed=1)
    return root


def _greedy(lm: PrefixLM) -> list[list[int]]:
    rows = lm.generate([PROMPT, PROMPT], adapters=["a", None], max_new_tokens=12, temperature=0.0, ignore_eos=True)
    return [r.tokens for r in rows]


@pytest.fixture(scope="module")
def float_tokens(tiny_model_dir, store) -> list[list[int]]:
    return _greedy(PrefixLM.load(str(tiny_model_dir), store=store, dtype="float32"))


def _kinds(model: nn.Module) -> dict[str, str]:
    """Each quantized linear layer's name -> its weight's dtype and scheme."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            dtype = module._packed_params.dtype  # fbgemm's packed fp16 weights cannot be unpacked
            out[name] = str(dtype) if dtype == torch.float16 else f"{dtype} {module.weight().qscheme()}"
    return out


def test_int8_makes_every_layer_per_channel_int8_but_the_head_fp16():
    model = quantize_model(make_tiny_model(seed=0), "int8")
    kinds = _kinds(model)
    assert kinds.pop("lm_head") == "torch.float16"
    assert len(kinds) == 2 * 7 and set(kinds.values()) == {"torch.qint8 torch.per_channel_affine"}  # 2 layers x 7
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.config.prefixtune_quantized == "int8"


def test_fp16_makes_every_linear_layer_fp16():
    kinds = _kinds(quantize_model(make_tiny_model(seed=0), "fp16"))
    assert len(kinds) == 2 * 7 + 1 and set(kinds.values()) == {"torch.float16"}


@pytest.mark.parametrize(("mode", "cosine"), [("fp16", 0.999999), ("int8", 0.999)])
def test_quantized_logits_stay_close_to_float32(mode, cosine):
    model = make_tiny_model(seed=0)
    ids = torch.tensor([[1, 500, 900, 1200, 77, 3000]])  # (1, T)
    with torch.no_grad():
        ref = model(ids).logits[0, -1]
        got = quantize_model(copy.deepcopy(model), mode)(ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(ref, got, dim=0) > cosine
    assert not torch.equal(ref, got)  # it did change the weights


def test_load_fp16_generates_float32s_greedy_tokens(tiny_model_dir, store, float_tokens):
    lm = PrefixLM.load(str(tiny_model_dir), store=store, dtype="float32", quantize="fp16")
    assert isinstance(lm.model.get_output_embeddings(), DynamicLinear)
    assert _greedy(lm) == float_tokens
    assert float_tokens[0] != float_tokens[1]  # the adapter steers the row it is on


def test_load_int8_serves_the_adapter(tiny_model_dir, store, float_tokens):
    lm = PrefixLM.load(str(tiny_model_dir), store=store, dtype="float32", quantize="int8")
    tokens = _greedy(lm)
    assert [len(t) for t in tokens] == [12, 12] and tokens[0] != tokens[1]  # the prefix still steers
    # Activations share one int8 scale per forward, so a random model's near-flat logits move: only the first
    # token of the adapter's row is held to equality (its prefix makes the top logit stand out).
    assert tokens[0][0] == float_tokens[0][0]
    assert lm.layout_mask().shape == (lm.model.config.vocab_size,)  # the quantized head's width is read right


@pytest.mark.parametrize("value", [None, "", "none", "OFF"])
def test_off_values_leave_the_model_alone(value):
    model = make_tiny_model(seed=0)
    assert check_quantize(value) is None and quantize_model(model, value) is model
    assert _kinds(model) == {}


def test_unknown_value_names_the_choices():
    with pytest.raises(QuantizeError, match=r"unknown --quantize 'int4'; choose one of int8, fp16 or none"):
        PrefixLM.load("tiny-does-not-matter", quantize="int4")


def test_a_gpu_model_is_refused_with_the_fix():
    with pytest.raises(QuantizeError, match=r"CPU kernels \(fbgemm\), not on cuda; fix: drop --quantize"):
        quantize._engine(torch.device("cuda"))


def test_a_torch_without_the_engine_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(quantize, "_ENGINES", ("no-such-engine",))
    with pytest.raises(QuantizeError, match=r"lacks \(it has: .*\); fix: install the official x86-64 torch wheel"):
        quantize_model(make_tiny_model(seed=0), "int8")
