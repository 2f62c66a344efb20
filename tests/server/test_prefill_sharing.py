"""n > 1 choices (and a guided request's n pairs) prefill their prompt once: ModelRunner.admit prefills a request
identical to one admitted with it (prompt, prefix tensors, kind) once and copies the columns, row by row, so the
rows of each request still finish their prompts in the same step; the outputs are those of separate prefills."""

from __future__ import annotations

import pytest
from test_engine_split import Sink, _drain, _ids

from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Request, Scheduler


def _run(lm, share: bool, prompt: str, adapter: str):
    s = Scheduler(lm, max_batch=16, start=False)
    s.runner.share_prefill = share
    ids, prefix = _ids(lm, prompt), lm.adapter(adapter).kv
    sinks = [Sink() for _ in range(7)]
    requests = [Request(ids, adapter, SamplingParams(max_new_tokens=6, temperature=1.0, seed=i), sink, prefix)
                for i, sink in enumerate(sinks[:4])]  # n=4 sampled choices
    requests += [Request(ids, adapter, SamplingParams(max_new_tokens=6, guidance_scale=2.0, temperature=0.8, seed=9),
                         sink, prefix, negative="beta") for sink in sinks[4:6]]  # n=2 guided choices (pairs)
    requests.append(Request(_ids(lm, "Another prompt here"), adapter, SamplingParams(max_new_tokens=6), sinks[6],
                            prefix))
    rows = []
    hook = lm.model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] > 1
        else None, with_kwargs=True)
    try:
        s.submit_many(requests)
        _drain(s)
    finally:
        hook.remove()
    assert s.running == 0 and s.in_flight == 0
    return [sink.tokens for sink in sinks], rows


@pytest.mark.parametrize("prompt", ["The cat sat on the mat and", "x"])
def test_shared_prefill_gives_the_same_tokens_with_fewer_prefilled_rows(serve_lm, prompt):
    shared, shared_rows = _run(serve_lm, True, prompt, "alpha")
    separate, separate_rows = _run(serve_lm, False, prompt, "alpha")
    assert shared == separate
    assert len({tuple(t) for t in shared[:4]}) > 1  # the choices still sample their own streams
    # One prefill forward: 4 + 2x2 + 1 = 9 rows separately; shared: the 4 choices' row, the 2 pairs' two rows, the
    # other prompt's row.
    assert separate_rows == [9] and shared_rows == [4]
