"""A step that fails never loses a request: every request gets a final output, the failed phase's requests an
error finish, the others go on, and the engine serves the next requests. Requests are records (eq=False)."""

from __future__ import annotations

import threading

import pytest

from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Scheduler


class Final:
    """Collects a request's outputs; `done` is set by its final one."""

    def __init__(self):
        self.outputs, self.done = [], threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finish_reason is not None:
            self.done.set()

    @property
    def finish(self):
        return self.outputs[-1].finish_reason if self.done.is_set() else None


def _request(lm, text, sink, n=6, adapter=None, **kw):
    return Request(lm.tokenizer(text).input_ids, adapter, SamplingParams(max_new_tokens=n, **kw), sink)


def _fail_once(target, name, after: int):
    """Make target.name raise on its (after+1)-th call, once."""
    real, calls = getattr(target, name), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            raise MemoryError("injected: out of memory growing the slot buffers")
        return real(*args, **kwargs)

    setattr(target, name, flaky)
    return calls


@pytest.mark.parametrize("phase", ["decode", "_prefill_forward", "sampler"])
def test_a_failing_phase_ends_its_requests_with_an_error_and_the_engine_goes_on(serve_lm, phase):
    s = Scheduler(serve_lm, max_batch=8)  # started: worker + output threads, as the server runs it
    try:
        sinks = [Final() for _ in range(4)]
        # One request ends exactly in the step that fails (max_new_tokens 2): its final output must still come.
        s.submit_many([_request(serve_lm, "Hello there", sinks[0], n=2, ignore_eos=True),
                       _request(serve_lm, "I feel", sinks[1], n=30, adapter="alpha", ignore_eos=True)])
        assert sinks[0].done.wait(30)
        _fail_once(s.runner, phase, after=0)  # the decode or prefill forward, or the sampler
        s.submit_many([_request(serve_lm, "The cat sat", sinks[2], n=30, ignore_eos=True),
                       _request(serve_lm, "x y", sinks[3], n=30, adapter="beta", ignore_eos=True)])
        assert all(sink.done.wait(30) for sink in sinks), "a request never got its final output"
        finishes = [sink.finish for sink in sinks]
        assert finishes[0] == "length"
        if phase == "_prefill_forward":  # only the joining requests ran in the failed forward
            assert finishes[1:] == ["length", "error", "error"]
        else:  # the decode forward / the sampler ran every running row
            assert "error" in finishes[1:] and set(finishes[1:]) <= {"error", "length"}
        error = next(sink.outputs[-1].error for sink in sinks if sink.finish == "error")
        assert "MemoryError" in error and "injected" in error
        after = Final()
        s.submit(_request(serve_lm, "Still here?", after, n=4, ignore_eos=True))
        assert after.done.wait(30) and after.finish == "length" and len(after.outputs[-1].token_ids) <= 4
        assert s.in_flight == 0 and s.running == 0 and len(s.runner) == 0
        assert s.stats.finished["error"] == finishes.count("error")
    finally:
        s.shutdown(timeout=5)


def test_a_step_failing_outside_the_runner_fails_what_was_admitted_and_serves_on(serve_lm):
    s = Scheduler(serve_lm, max_batch=4, start=False)
    sinks = [Final() for _ in range(2)]
    s.submit_many([_request(serve_lm, "Hello", sinks[0]), _request(serve_lm, "Bye", sinks[1], adapter="alpha")])
    real = s.update_from_output
    s.update_from_output = lambda out: (_ for _ in ()).throw(RuntimeError("injected bookkeeping bug"))
    s.run_once()
    assert [sink.finish for sink in sinks] == ["error", "error"] and "injected" in s.error
    s.update_from_output = real
    again = Final()
    s.submit(_request(serve_lm, "Hello", again, n=3))
    while s.run_once():
        pass
    assert again.finish in ("length", "stop") and s.in_flight == 0


def test_identical_requests_with_prefixes_from_two_loads_can_be_cancelled(serve_lm):
    s = Scheduler(serve_lm, max_batch=1, start=False)
    busy, first, second = Final(), Final(), Final()
    s.submit(_request(serve_lm, "Occupy the only row", busy, n=3))
    s.run_once()
    ids = serve_lm.tokenizer("Same prompt").input_ids
    kv_one = serve_lm.adapter("alpha").kv
    serve_lm.cache.drop("alpha")  # an admin reload: equal values, another tensor
    kv_two = serve_lm.adapter("alpha").kv
    assert kv_one is not kv_two
    a = Request(list(ids), "alpha", SamplingParams(max_new_tokens=3), first, prefix=kv_one)
    b = Request(list(ids), "alpha", SamplingParams(max_new_tokens=3), second, prefix=kv_two, request_id=a.request_id + "b")
    s.submit_many([a, b])
    assert s.cancel(b.request_id)  # a dataclass with eq=True compared the tensors here and raised
    while s.run_once():
        pass
    assert second.finish == "cancelled" and first.finish in ("length", "stop") and busy.done.is_set()
