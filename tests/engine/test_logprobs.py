"""Log-probabilities on the engine: PrefixLM.score and generate(logprobs=N) against a plain forward pass."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefixtune.engine.offline import run_requests
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.testing import forward_logprobs

TEXTS = ["The weather today is rather cold and grey", "Hi there", "Once upon a time, in a land far away, a fox",
         "Emotion: joy\nText: i feel glad"]


def _forward_logits(model_dir, lm, text, adapter) -> list[list[float]]:
    """Logits at every position but the last, from one plain forward of transformers (PEFT's prefix for an
    adapter), independent of the engine's slots and masks."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(lm.store.folder(adapter)))
    ids = torch.tensor([lm.tokenizer(text).input_ids])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float().tolist()


def _forward_logprobs(model_dir, lm, text, adapter) -> list[float]:
    folder = None if adapter is None else lm.store.folder(adapter)
    return forward_logprobs(model_dir, lm.tokenizer(text).input_ids, folder)


def test_score_equals_a_plain_forward_in_a_mixed_batch(lm, tiny_model_dir):
    adapters = ["a", None, "b", "a"]
    scores = lm.score(TEXTS, adapters, top_logprobs=3)
    for text, adapter, got in zip(TEXTS, adapters, scores):
        want = _forward_logprobs(tiny_model_dir, lm, text, adapter)
        assert got.tokens == lm.tokenizer(text).input_ids and got.adapter == adapter
        assert got.logprobs[0] is None and got.top[0] is None
        assert torch.allclose(torch.tensor(got.logprobs[1:]), torch.tensor(want), atol=1e-4), adapter
        assert got.total == pytest.approx(sum(want), abs=1e-3)
        for lp, top in zip(got.logprobs[1:], got.top[1:]):
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and top[0][1] >= lp - 1e-6
    # The adapters matter: otherwise equal numbers would prove nothing about the prefix.
    a, b = lm.score([TEXTS[0]] * 2, ["a", "b"])
    assert max(abs(x - y) for x, y in zip(a.logprobs[1:], b.logprobs[1:])) > 1e-2


def test_scoring_rows_beside_generating_rows(lm, tiny_model_dir):
    """Chunked prefill and decoding rows in the same steps do not change a scoring row's numbers."""
    ids = [lm.tokenizer(t).input_ids for t in TEXTS]
    kv = lm.adapter("a").kv
    requests = [Request(ids[0], "a", SamplingParams(max_new_tokens=6), prefix=kv),
                Request(ids[2], "a", SamplingParams(max_new_tokens=0, prompt_logprobs=0), prefix=kv),
                Request(ids[1], None, SamplingParams(max_new_tokens=3, prompt_logprobs=2, logprobs=2))]
    done = run_requests(lm, requests)
    want = _forward_logprobs(tiny_model_dir, lm, TEXTS[2], "a")
    assert done[1].tokens == [] and done[1].finish_reason == "length"
    assert torch.allclose(torch.tensor([e[0] for e in done[1].prompt_logprobs[1:]]), torch.tensor(want), atol=1e-4)
    assert done[0].prompt_logprobs is None and done[0].logprobs == []  # not asked: nothing recorded
    assert len(done[2].prompt_logprobs) == len(ids[1]) and len(done[2].logprobs) == len(done[2].tokens) == 3


def test_generate_logprobs_are_the_greedy_tokens(lm):
    rows = lm.generate(TEXTS[:2], ["b", None], max_new_tokens=5, logprobs=2, ignore_eos=True)
    for row in rows:
        assert len(row.logprobs) == len(row.tokens) == 5
        for token, (lp, top) in zip(row.tokens, row.logprobs):
            assert top[0][0] == token and top[0][1] == pytest.approx(lp) and lp <= 0  # greedy: the top token
    # Each token's log-prob is of the distribution after the prompt and the tokens before it: scoring agrees.
    ids = lm.tokenizer(TEXTS[0]).input_ids + rows[0].tokens
    scored = run_requests(lm, [Request(ids, "b", SamplingParams(max_new_tokens=0, prompt_logprobs=0),
                                       prefix=lm.adapter("b").kv)])[0]
    assert [e[0] for e in scored.prompt_logprobs[-5:]] == pytest.approx([lp for lp, _ in rows[0].logprobs], abs=1e-4)


def test_guided_scores_are_the_combined_distribution(lm, tiny_model_dir):
    """A guided row's prompt log-probs are of what it samples from: guided_logits of its two rows."""
    from prefixtune.engine.guidance import guided_logits

    text = TEXTS[2]
    ids = torch.tensor(lm.tokenizer(text).input_ids)
    cond = torch.tensor(_forward_logits(tiny_model_dir, lm, text, "a"))
    uncond = torch.tensor(_forward_logits(tiny_model_dir, lm, text, None))
    combined = guided_logits(cond, uncond, 2.0, eos_ids=sorted(lm.eos_ids()), layout=lm.layout_mask())
    want = torch.log_softmax(combined, -1).gather(-1, ids[1:].view(-1, 1)).view(-1)
    got = lm.score([text], ["a"], guidance_scale=2.0)[0]
    assert torch.allclose(torch.tensor(got.logprobs[1:]), want, atol=1e-4)
    plain = lm.score([text], ["a"], guidance_scale=1.0)[0]
    assert max(abs(x - y) for x, y in zip(plain.logprobs[1:], got.logprobs[1:])) > 1e-3


def test_scoring_refuses_what_it_cannot_do(lm):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0).validate()
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(num_beams=2, logprobs=1).validate()
    with pytest.raises(ValueError, match="one adapter per text"):
        lm.score(TEXTS, ["a"])


def test_chunked_prefill_scores_the_same(lm, tiny_model_dir):
    """A scoring prompt that joins over several steps (4-token budget) beside a decoding row."""
    from prefixtune.engine.scheduler import Scheduler

    engine = Scheduler(lm, max_batch=4, start=False, max_step_tokens=4)
    kv = lm.adapter("b").kv
    outputs: dict[str, list] = {"gen": [], "score": []}
    first = Request(lm.tokenizer(TEXTS[1]).input_ids, "b", SamplingParams(max_new_tokens=12, ignore_eos=True),
                    prefix=kv, emit=outputs["gen"].append)
    engine.submit(first)
    engine.run_once()  # the generating row is decoding before the scoring row arrives
    ids = lm.tokenizer(TEXTS[2]).input_ids
    engine.submit(Request(ids, "b", SamplingParams(max_new_tokens=0, prompt_logprobs=1), prefix=kv,
                          emit=outputs["score"].append))
    steps = 1
    while engine.run_once():
        steps += 1
    assert steps >= len(ids) // 3  # it did join over several steps
    (final,) = outputs["score"]
    want = _forward_logprobs(tiny_model_dir, lm, TEXTS[2], "b")
    assert final.finish_reason == "length" and final.token_ids == []
    assert torch.allclose(torch.tensor([e[0] for e in final.prompt_logprobs[1:]]), torch.tensor(want), atol=1e-4)
