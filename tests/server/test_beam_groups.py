"""Beam groups in the engine (engine/sampler.py): the same beams as offline search, alone or in a
mixed continuous batch, the prompt prefilled once, cancellation frees every row of the group."""

from __future__ import annotations

import pytest
from test_engine_split import PROMPTS, Sink, _drain, _ids

from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Request, Scheduler

BEAMS = dict(num_beams=4, length_penalty=0.7, no_repeat_ngram_size=2)


def _beam_request(lm, prompt, adapter, sink, n=8, returns=3, **kw):
    params = SamplingParams(max_new_tokens=n, num_return_sequences=returns, **{**BEAMS, **kw})
    return Request(_ids(lm, prompt), adapter, params, sink)


def _choices(sink) -> list[list[int]]:
    by_index = {o.index: o for o in sink.outputs}
    return [by_index[i].token_ids for i in range(len(by_index))]


def test_beam_group_in_a_mixed_batch_matches_alone_and_offline(sharp_lm):
    prompt = PROMPTS[1]
    offline = sharp_lm.generate([prompt], "alpha", max_new_tokens=8, **BEAMS)[0]
    greedy = sharp_lm.generate([prompt], "alpha", max_new_tokens=8)[0]
    assert offline.tokens != greedy.tokens, "beams must change the output (else vacuous)"
    s = Scheduler(sharp_lm, max_batch=8, start=False)
    alone = Sink()
    s.submit(_beam_request(sharp_lm, prompt, "alpha", alone))
    _drain(s)
    assert s.stats.prefills == 1 and s.stats.prompt_tokens == len(_ids(sharp_lm, prompt))
    s = Scheduler(sharp_lm, max_batch=8, start=False)
    mixed, others = Sink(), [Sink() for _ in range(3)]
    greedy_others = [sharp_lm.generate([p], a, max_new_tokens=n)[0] for p, a, n in
                     [(PROMPTS[0], "beta", 12), (PROMPTS[3], None, 5)]]
    s.submit(Request(_ids(sharp_lm, PROMPTS[0]), "beta", SamplingParams(max_new_tokens=12), others[0]))
    s.run_once()
    s.run_once()  # the beam group joins a batch two tokens in, beside a sampled row
    s.submit_many([_beam_request(sharp_lm, prompt, "alpha", mixed),
                   Request(_ids(sharp_lm, PROMPTS[2]), None, SamplingParams(max_new_tokens=3, temperature=1.0,
                                                                            seed=1), others[1])])
    s.run_once()
    s.submit(Request(_ids(sharp_lm, PROMPTS[3]), None, SamplingParams(max_new_tokens=5), others[2]))
    _drain(s)
    assert _choices(alone) == _choices(mixed) and len(_choices(mixed)) == 3
    n_best = sharp_lm.generate([prompt], "alpha", max_new_tokens=8, num_return_sequences=3, **BEAMS)
    assert _choices(mixed) == [h.tokens for h in n_best] and n_best[0].tokens == offline.tokens
    assert "".join(o.text for o in mixed.outputs if o.index == 0) == offline.text
    assert [o.finish_reason is not None for o in mixed.outputs] == [True] * 3  # choices arrive finished, at once
    assert [others[0].tokens, others[2].tokens] == [g.tokens for g in greedy_others]
    assert s.stats.finished["length"] + s.stats.finished["stop"] == 4  # the beam group is one request
    assert s.stats.max_batch_size == 4 + 3 and s.running == 0 and s.in_flight == 0


def test_cancelled_beam_group_frees_every_row(sharp_lm):
    s = Scheduler(sharp_lm, max_batch=8, start=False)
    sink, other = Sink(), Sink()
    beams = _beam_request(sharp_lm, PROMPTS[0], "beta", sink, n=40, returns=2, no_repeat_ngram_size=0)
    s.submit_many([beams, Request(_ids(sharp_lm, PROMPTS[2]), "alpha", SamplingParams(max_new_tokens=6), other)])
    s.run_once()
    s.run_once()
    assert len(s.runner) == 5
    assert s.cancel(beams.request_id)
    s.run_once()
    assert len(s.runner) == 1
    assert [(o.index, o.finish_reason) for o in sink.outputs] == [(0, "cancelled"), (1, "cancelled")]
    _drain(s)
    assert other.tokens == sharp_lm.generate([PROMPTS[2]], "alpha", max_new_tokens=6)[0].tokens
    assert s.running == 0 and s.in_flight == 0 and s.stats.finished["cancelled"] == 1


def test_a_failed_or_aborted_beam_request_finishes_every_choice(sharp_lm):
    s = Scheduler(sharp_lm, max_batch=8, start=False)
    bad, aborted = Sink(), Sink()
    s.submit_many([_beam_request(sharp_lm, "hi", "no-such-adapter", bad),
                   _beam_request(sharp_lm, "hi", "alpha", aborted, n=40, returns=2)])
    s.run_once()
    assert [(o.index, o.finish_reason) for o in bad.outputs] == [(0, "error"), (1, "error"), (2, "error")]
    s.shutdown(timeout=0)
    assert [(o.index, o.finish_reason) for o in aborted.outputs] == [(0, "abort"), (1, "abort")]


def test_beam_settings_that_make_no_sense_are_refused(sharp_lm):
    s = Scheduler(sharp_lm, max_batch=4, start=False)
    for kw, message in [(dict(temperature=0.8), "temperature 0"), (dict(guidance_scale=2.0), "guidance"),
                        (dict(ignore_eos=True), "ignore_eos"), (dict(num_beams=5), "max_batch is 4")]:
        with pytest.raises(ValueError, match=message):
            s.submit(_beam_request(sharp_lm, "hi", "alpha", Sink(), returns=1, **kw))
    with pytest.raises(ValueError, match="num_return_sequences"):
        s.submit(_beam_request(sharp_lm, "hi", "alpha", Sink(), returns=5))
    assert s.waiting == 0
