"""Penalties and logit bias: OpenAI's and HF's definitions, each row its own, rows without them untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from prefixtune.engine.offline import run_requests
from prefixtune.engine.penalties import apply_penalties, new_penalty
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Scheduler


def _state(params: SamplingParams, prompt: list[int], generated: list[int]):
    p = new_penalty(params, prompt)
    p.ready(50, torch.device("cpu"))
    for t in generated:
        p.accept(t)
    return p


def test_presence_frequency_and_bias_follow_openai_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    generated = [4, 4, 4, 7, 9, 9]
    p = _state(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: -100.0, 7: 2.5}),
               [1, 2], generated)
    out = apply_penalties(logits, [1], [p])
    want = logits[1].clone()
    for token in set(generated):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        want[token] -= generated.count(token) * 0.25 + 0.5
    want[3] -= 100.0
    want[7] += 2.5
    torch.testing.assert_close(out[1], want)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])  # other rows: bit for bit


def test_repetition_penalty_equals_transformers_processor():
    torch.manual_seed(1)
    logits = torch.randn(2, 50)
    prompt, generated = [1, 2, 30], [5, 30, 41]
    rows = [_state(SamplingParams(repetition_penalty=r), prompt, generated) for r in (1.3, 0.7)]
    out = apply_penalties(logits, [0, 1], rows)
    seen = torch.tensor([prompt + generated])
    for i, r in enumerate((1.3, 0.7)):
        want = RepetitionPenaltyLogitsProcessor(r)(seen, logits[i:i + 1].clone())
        torch.testing.assert_close(out[i:i + 1], want)


def _request(lm, prompt: str, adapter: str | None, **params) -> Request:
    ids = lm.tokenizer(prompt).input_ids
    return Request(ids, adapter, SamplingParams(max_new_tokens=16, ignore_eos=True, **params))


def test_each_row_penalty_affects_only_that_row(lm):
    """Greedy (batch-mate float noise can flip a sampled draw; DEVELOPERS.md): a penalised row beside rows of
    other adapters and settings; the rows without penalties equal their solo runs, the penalised one its own."""
    token = lm.tokenizer(",").input_ids[-1]
    # +8 makes the bias token the greedy choice; the frequency penalty pulls it down after a few repeats.
    penalised = dict(logit_bias={token: 8.0}, frequency_penalty=2.0)
    specs = [("The weather today is", "a", {}), ("The weather today is", "a", penalised),
             ("Hi there", None, {"repetition_penalty": 1.8}), ("Hi there", None, {})]
    mixed = run_requests(lm, [_request(lm, p, a, **kw) for p, a, kw in specs])
    solo = [run_requests(lm, [_request(lm, p, a, **kw)])[0] for p, a, kw in specs]
    assert [m.tokens for m in mixed] == [s.tokens for s in solo]
    biased_only = run_requests(lm, [_request(lm, specs[1][0], "a", logit_bias={token: 8.0})])[0].tokens
    assert biased_only == [token] * 16  # the bias alone: the token every step
    assert mixed[1].tokens != biased_only and 2 <= mixed[1].tokens.count(token) < 16
    assert mixed[1].tokens != mixed[0].tokens


@pytest.mark.parametrize("params, needle", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(num_beams=2, frequency_penalty=1.0), "beam search"),
])
def test_bad_settings_are_refused_naming_them(params, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**params).validate()


def test_bias_on_a_token_the_model_lacks_is_refused_at_submit(lm):
    engine = Scheduler(lm, start=False)
    with pytest.raises(ValueError, match="logit_bias token id 999999 is out of range"):
        engine.submit(_request(lm, "Hi", None, logit_bias={999999: 1.0}))
    assert engine.in_flight == 0
