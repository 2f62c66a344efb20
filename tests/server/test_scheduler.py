"""The serving scheduler without HTTP: continuous batching against offline generate, limits, cancel, shutdown."""

from __future__ import annotations

import math
import threading

import pytest

from prefixtune.bench.serve_speed import bench_scheduler
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import QueueFull, Request, Scheduler, SchedulerClosed
from prefixtune.engine.text import TextTracker

PROMPTS = ["Hello there", "The cat sat on the mat and", "I am feeling", "x y z"]
ADAPTER_ROWS = ["alpha", "beta", None, "alpha"]


class Sink:
    """Collects one request's outputs."""

    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finish_reason is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def finish(self) -> str | None:
        return self.outputs[-1].finish_reason if self.outputs else None


def _request(lm, prompt, adapter, sink, n=10, **kw):
    return Request(lm.tokenizer(prompt).input_ids, adapter, SamplingParams(max_new_tokens=n, **kw), sink)


def _drain(s: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if not s.run_once():
            return
    raise AssertionError("scheduler did not finish")


def test_rows_joining_mid_flight_match_offline(serve_lm):
    offline = serve_lm.generate(PROMPTS, ADAPTER_ROWS, max_new_tokens=10)
    assert len({g.text for g in offline}) == len(offline), "adapters must change the output (else vacuous)"
    s = Scheduler(serve_lm, max_batch=8, start=False)
    sinks = [Sink() for _ in PROMPTS]
    reqs = [_request(serve_lm, p, a, k) for p, a, k in zip(PROMPTS, ADAPTER_ROWS, sinks)]
    s.submit(reqs[0])
    for _ in range(3):
        s.run_once()
    s.submit_many(reqs[1:3])  # join a batch that is 3 tokens in (prefix lengths 4, 7 and none)
    s.run_once()
    s.run_once()
    s.submit(reqs[3])
    _drain(s)
    for sink, g in zip(sinks, offline):
        assert (sink.text, sink.tokens, sink.finish) == (g.text, g.tokens, g.finish_reason)
    assert s.stats.prefills == 3 and s.stats.max_adapters_in_batch == 3 and s.stats.max_batch_size == 4
    assert s.running == 0 and s.in_flight == 0


def test_grouped_mode_runs_one_adapter_at_a_time(serve_lm):
    offline = serve_lm.generate(PROMPTS, ADAPTER_ROWS, max_new_tokens=6)
    s = Scheduler(serve_lm, max_batch=8, mode="grouped", start=False)
    sinks = [Sink() for _ in PROMPTS]
    s.submit_many([_request(serve_lm, p, a, k, n=6) for p, a, k in zip(PROMPTS, ADAPTER_ROWS, sinks)])
    _drain(s)
    assert [k.text for k in sinks] == [g.text for g in offline]
    assert s.stats.max_adapters_in_batch == 1 and s.stats.prefills == 3


def test_queue_limit_is_all_or_nothing(serve_lm):
    s = Scheduler(serve_lm, max_batch=1, max_queue=2, start=False)
    s.submit(_request(serve_lm, "a", None, Sink()))
    with pytest.raises(QueueFull):
        s.submit_many([_request(serve_lm, "b", None, Sink()), _request(serve_lm, "c", None, Sink())])
    assert s.waiting == 1  # none of the two was queued
    s.submit(_request(serve_lm, "d", None, Sink()))
    assert s.waiting == 2


def test_cancel_waiting_and_running_rows(serve_lm):
    s = Scheduler(serve_lm, max_batch=1, start=False)
    running, waiting = Sink(), Sink()
    r1 = _request(serve_lm, "Hello", "alpha", running, n=50)
    r2 = _request(serve_lm, "Bye", "beta", waiting, n=50)
    s.submit_many([r1, r2])
    s.run_once()
    s.run_once()
    assert s.running == 1 and s.waiting == 1
    assert s.cancel(r2.request_id) and waiting.finish == "cancelled" and s.waiting == 0
    assert s.cancel(r1.request_id)
    s.run_once()
    assert running.finish == "cancelled" and s.running == 0 and s.in_flight == 0
    assert len(running.tokens) < 50
    assert not s.cancel(r1.request_id)  # already gone


def test_unloadable_adapter_fails_only_its_request(serve_lm):
    s = Scheduler(serve_lm, start=False)
    bad, good = Sink(), Sink()
    s.submit_many([_request(serve_lm, "Hi", "no-such-adapter", bad), _request(serve_lm, "Hi", "beta", good, n=3)])
    _drain(s)
    assert bad.finish == "error" and "no-such-adapter" in bad.outputs[-1].error
    assert good.finish == "length" and len(good.tokens) == 3


def test_max_model_len_is_checked(serve_lm):
    s = Scheduler(serve_lm, max_model_len=20, start=False)
    prefix = serve_lm.adapter("beta").kv  # 7 virtual tokens count too
    ids = serve_lm.tokenizer("one two three").input_ids
    with pytest.raises(ValueError, match="max_model_len"):
        s.submit(Request(ids, "beta", SamplingParams(max_new_tokens=20 - 7 - len(ids) + 1), prefix=prefix))
    s.submit(Request(ids, "beta", SamplingParams(max_new_tokens=20 - 7 - len(ids)), prefix=prefix))


def test_shutdown_aborts_and_refuses(serve_lm):
    s = Scheduler(serve_lm, max_batch=1)
    long_row, queued = Sink(), Sink()
    s.submit_many([_request(serve_lm, "Hi", None, long_row, n=10_000, ignore_eos=True),
                   _request(serve_lm, "Yo", None, queued)])
    assert s.shutdown(timeout=0.3)  # drains for 0.3 s, then aborts: never hangs on a long request
    assert long_row.done.is_set() and long_row.finish == "abort" and queued.finish == "abort"
    with pytest.raises(SchedulerClosed):
        s.submit(_request(serve_lm, "late", None, Sink()))


class _Pieces:
    """A fake tokenizer whose tokens are text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_text_tracker_holds_back_a_possible_stop():
    t = TextTracker(_Pieces(["Hel", "lo ", "wo", "rld", "\ufffd"]), ["o wor"])
    assert t.push(0) == ("Hel", False)
    assert t.push(1) == ("l", False)  # "o " could start "o wor": held back
    assert t.push(2) == ("", False)  # "o wo" still could
    assert t.push(3) == ("", True)  # "Hello world" holds the stop: text ends before it
    t = TextTracker(_Pieces(["ab", "\ufffd", "c"]), [])
    assert t.push(0) == ("ab", False)
    assert t.push(1) == ("", False)  # a half character waits for the next token
    assert t.flush() == "\ufffd"


def test_bench_scheduler_measures_both_modes_and_refuses_an_incomplete_run(serve_lm):
    for mode in ("continuous", "grouped"):  # raises unless every request finished with all its tokens
        rate = bench_scheduler(serve_lm, PROMPTS * 2, ADAPTER_ROWS * 2, mode, max_new_tokens=[2, 6, 3, 4] * 2,
                               max_batch=4)
        assert math.isfinite(rate)
    with pytest.raises(RuntimeError, match="incomplete"):
        bench_scheduler(serve_lm, PROMPTS, ADAPTER_ROWS, max_new_tokens=200, max_batch=4, timeout=0.0)
