"""Drift guard on the real bundled model (30 layers, GQA 9/3): PEFT parity, mixed rows, generation."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

import transformers
from prefixtune.prefix.encoder import PrefixConfig
from prefixtune.prefix.model import PrefixModel
from prefixtune.testing import engine_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from prefixtune.models import load_base_model

    loaded = load_base_model("smollm2-135m", device="cpu", dtype="float32")
    pm = PrefixModel(loaded.model)
    torch.manual_seed(0)
    for name, tokens in (("a", 8), ("b", 3)):
        enc = pm.add_adapter(name, PrefixConfig(num_virtual_tokens=tokens, prefix_projection=False))
        with torch.no_grad():
            enc.embedding.weight.mul_(0.5)
    return loaded, pm


def test_smollm2_logits_and_generation_match_peft(smol):
    from peft import PrefixTuningConfig, get_peft_model

    loaded, pm = smol
    ids = loaded.tokenizer(["Emotion: joy\nText: i feel"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    peft_model = get_peft_model(loaded.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    peft_model.prompt_encoder["default"].load_state_dict(pm.encoders["a"].state_dict())
    peft_model.eval()
    with torch.no_grad():
        ours = pm(ids, mask, ["a"]).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        base = pm(ids, mask, [None]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - base).abs().max() > 0.1, "the prefix must change the output"
    tokens = engine_greedy(loaded.model, ids.tolist(), pm.prefixes(["a"]), 6, tokenizer=loaded.tokenizer)[0]
    assert tokens[0] == int(ours[0, -1].argmax()), "first generated token = argmax of a plain forward"
    if Version(transformers.__version__) != Version("5.24.0"):  # PEFT's generate drops the prefix there
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                      do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
        assert tokens == out[0, ids.shape[1]:].tolist()


def test_smollm2_mixed_batch_equals_rows_alone(smol):
    loaded, pm = smol
    prompts = ["Text: i feel", "Emotion: anger\nText:", "Hello", "Text: today i"]
    adapters = ["a", "b", None, "a"]
    ids = loaded.tokenizer(prompts).input_ids
    mixed = engine_greedy(loaded.model, ids, pm.prefixes(adapters), 5, tokenizer=loaded.tokenizer)
    for row, adapter in enumerate(adapters):
        alone = engine_greedy(loaded.model, ids[row:row + 1], pm.prefixes([adapter]), 5, tokenizer=loaded.tokenizer)
        assert mixed[row] == alone[0], f"row {row} ({adapter})"
