"""Chunked prefill: a long prompt joins over several steps within the step's token budget, the running rows
produce a token every one of those steps, and every output equals the one without chunking."""

from __future__ import annotations

import pytest
from test_engine_split import PROMPTS, Sink, _ids

from prefixtune.engine.policy import chunks, step_tokens
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Request, Scheduler


def test_the_budget_counts_decode_rows_and_gives_prefill_at_least_half():
    pending = [("a", 1, 50), ("b", 2, 7), ("c", 1, 3)]
    assert chunks(pending, 16, decoding=4) == [("a", 12)]  # 16 - 4 rows; a request in order takes what is left
    assert chunks(pending, 16, decoding=15) == [("a", 8)]  # a full batch: still half the budget to prefill
    assert chunks([("b", 2, 7), ("c", 1, 3)], 16, decoding=0) == [("b", 7), ("c", 3)]  # nobody waits: whole
    assert chunks([("b", 2, 7), ("c", 1, 3)], 12, decoding=2) == [("b", 5)]  # a pair's rows advance together
    assert chunks(pending, None, decoding=4) == [("a", 50), ("b", 7), ("c", 3)]
    assert step_tokens("auto", "cpu") == 24 and step_tokens("auto", "cuda") == 2048 and step_tokens(0, "cpu") is None
    for bad in (1, -3, "12", 2.5, True):
        with pytest.raises(ValueError, match="max_step_tokens"):
            step_tokens(bad, "cpu")


def _run(lm, budget):
    s = Scheduler(lm, max_batch=8, start=False, max_step_tokens=budget)
    running = [Sink() for _ in range(3)]
    s.submit_many([Request(_ids(lm, p), a, SamplingParams(max_new_tokens=40, ignore_eos=True), sink)
                   for p, a, sink in zip(PROMPTS, ["alpha", None, "beta"], running)])
    s.run_once()
    long, joined = Sink(), Sink()
    ids = _ids(lm, " ".join(PROMPTS * 6))
    s.submit_many([Request(ids, "alpha", SamplingParams(max_new_tokens=6), long),
                   Request(_ids(lm, PROMPTS[3]), "beta", SamplingParams(max_new_tokens=6, guidance_scale=2.0), joined,
                           negative="alpha")])
    steps, produced = 0, []
    while not long.outputs:
        before = [len(r.outputs) for r in running]
        s.run_once()
        produced.append([len(r.outputs) - b for r, b in zip(running, before)])
        steps += 1
    while s.run_once():
        pass
    return [r.tokens for r in running] + [long.tokens, joined.tokens], steps, produced, len(ids)


def test_a_long_prompt_joins_over_several_steps_while_running_rows_keep_producing(serve_lm):
    whole, whole_steps, _, n = _run(serve_lm, None)
    chunked, steps, produced, _ = _run(serve_lm, 8)  # 3 decoding rows: 5 prompt tokens a step (4 at least)
    assert whole_steps == 1 and steps >= n // 5  # the prompt took many steps instead of one
    assert all(p == [1, 1, 1] for p in produced)  # every running row got its token in every one of them
    assert chunked == whole  # chunking changes when tokens come, not which
