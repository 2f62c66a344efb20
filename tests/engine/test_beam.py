"""Beam search (engine/beam.py): equals greedy at one beam, transformers' own beam search on base rows, and a
prefix row's beams in a mixed batch equal that adapter's beams run alone."""

from __future__ import annotations

import pytest
import torch

from types import SimpleNamespace

from prefixtune.engine.beam import BeamParams, banned_tokens
from prefixtune.engine.lm import PrefixLM
from prefixtune.testing import make_tiny_model, make_tiny_tokenizer

PROMPTS = ["The Eagle is a French", "Hello there, how are", "x"]


def test_one_beam_is_greedy(lm):
    adapters = ["a", None, "b"]
    greedy = lm.generate(PROMPTS, adapters, max_new_tokens=8)
    one = lm.generate(PROMPTS, adapters, max_new_tokens=8, num_beams=1)
    assert [g.tokens for g in one] == [g.tokens for g in greedy]


def test_prefix_rows_beams_in_a_mixed_batch_equal_their_runs_alone(lm):
    adapters = ["a", None, "b"]
    kw = dict(max_new_tokens=8, num_beams=4, no_repeat_ngram_size=2, length_penalty=0.7)
    mixed = lm.generate(PROMPTS, adapters, **kw)
    for prompt, adapter, got in zip(PROMPTS, adapters, mixed):
        alone = lm.generate([prompt], [adapter], **kw)[0]
        assert got.tokens == alone.tokens and got.score == pytest.approx(alone.score, abs=1e-4)
        assert got.adapter == adapter and got.score is not None
    # The adapter must change the beams, or the comparison above would prove nothing.
    same = lm.generate([PROMPTS[0]] * 3, ["a", "b", None], **kw)
    assert len({tuple(g.tokens) for g in same}) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(num_beams=4, length_penalty=0.5, no_repeat_ngram_size=2),
                                dict(num_beams=3, early_stopping=True, length_penalty=2.0)])
def test_base_rows_match_transformers_beam_search(arch, kw, tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(arch)
    stops = 0
    # Two EOS choices: one the beams hit (finished hypotheses compete with running ones), one they never hit.
    lm = PrefixLM(SimpleNamespace(model=model, tokenizer=tok, name=arch, fingerprint=""), tmp_path / "store")
    for eos in (359, tok.eos_token_id):
        lm.eos_ids = lambda eos=eos: {eos}
        ours = lm.generate(PROMPTS[:2], None, max_new_tokens=12, **kw)
        for i, prompt in enumerate(PROMPTS[:2]):
            alone = tok([prompt], return_tensors="pt")
            with torch.no_grad():
                hf = model.generate(**alone, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                                    pad_token_id=tok.pad_token_id, **kw)
            best = ours[i]
            stops += best.finish_reason == "stop"
            assert hf[0, alone.input_ids.shape[1]:].tolist() == best.tokens + ([eos] * (best.finish_reason == "stop"))
    if arch == "gpt2" and kw.get("no_repeat_ngram_size"):
        assert stops > 0  # this case really ends a beam at EOS


def test_n_best_are_sorted_and_distinct(lm):
    hyps = lm.generate([PROMPTS[0]], "a", max_new_tokens=6, num_beams=4, num_return_sequences=3)
    assert len(hyps) == 3 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert len({tuple(h.tokens) for h in hyps}) == 3


def test_no_repeat_ngram_rule():
    assert banned_tokens([1, 2, 3, 1], 2) == [2]
    assert banned_tokens([1, 2, 1, 2, 1], 3) == [2]  # the tail "2 1" was once followed by 2
    assert sorted(banned_tokens([5, 6], 1)) == [5, 6]
    assert banned_tokens([5], 3) == []


def test_bad_settings_name_the_fix(lm):
    with pytest.raises(ValueError, match="temperature 0"):
        lm.generate(["x"], num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="num_beams >= 2"):
        lm.generate(["x"], no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        BeamParams(2, num_return_sequences=3).validate()
