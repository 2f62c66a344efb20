"""The front end's handle on an engine core process (engine/core.py): the Scheduler's interface over a pipe.

The server uses it exactly as a local Scheduler (submit, cancel, shutdown, stats, alive). The model runs in the
child; this process keeps the output processor, so detokenizing, stop strings, the event loop and HTTP never
take the GIL from the decode loop. A stop string found here cancels the row there, as vLLM v1 aborts it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Sequence

from prefixtune.engine import core
from prefixtune.engine.core import STAT_FIELDS, EngineSpec
from prefixtune.engine.output import OutputProcessor, RowEvent
from prefixtune.engine.requests import QueueFull, Request, RetryableError, SchedulerClosed, SchedulerStats

__all__ = ["EngineClient", "EngineSpec"]

ADAPTER_TIMEOUT_S = 30.0  # how long an admin load or unload waits for the core before it is rolled back


# What every engine process imports before it loads a model (torch, transformers, the engine: ~4 s on a 2-core
# CPU). A fork server imports them once, with no thread started and no device touched, and forks each engine
# process from there: a fresh process, as spawn gives, that starts in ~1 s, including a supervisor's restart.
# Forking this process instead would copy torch's threads and locks mid-state.
PRELOAD = ["prefixtune.engine.core", "prefixtune.engine.lm", "prefixtune.engine.scheduler", "prefixtune.models"]


def _context():
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:  # a platform without fork (Windows)
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload(PRELOAD)
    return context


class EngineClient:
    """Starts the core process and waits until its model is loaded (re-raising its load error).

    `lm` is this process's PrefixLM: the tokenizer, the config and the adapter store over the model on the meta
    device (no weights here), so the front end tokenizes and checks adapters against the core's fingerprint.
    """

    def __init__(self, spec: EngineSpec, start_timeout: float = 900.0):
        context = _context()
        self._conn, child = context.Pipe(duplex=True)
        # This process's environment as of now (the fork server's is as of its own start).
        self.process = context.Process(target=core.main, args=(child, spec, dict(os.environ)), name="prefixtune-engine",
                                       daemon=True)
        self.process.start()
        child.close()
        try:
            # The shell (tokenizer, config, meta model) loads here while the core loads the weights: startup
            # takes the longer of the two, not their sum.
            shell = _shell(spec)
            self.info = self._wait_ready(start_timeout)  # fingerprint, dtype, device, max_model_len of the model
            self.lm = _front_lm(spec, shell, self.info)
        except BaseException:
            self.process.kill()
            raise
        self.max_batch, self.max_queue, self.mode = spec.max_batch, spec.max_queue, spec.mode
        self.max_inflight_tokens = spec.max_inflight_tokens
        self.max_model_len = self.info["max_model_len"]
        self.lm_lock = threading.RLock()  # guards the front end's PrefixLM (the adapter registry's)
        self.stats = SchedulerStats()  # the core's counters as of its last message; finished counted here
        self._carried: dict[str, int] = {}  # totals of the cores before this one (carry_counters)
        # Its own tokenizer copy: the server encodes prompts with lm.tokenizer on another thread.
        self.output = OutputProcessor(copy.deepcopy(self.lm.tokenizer), self.stats, self._on_stop)
        self.error: str | None = None
        self._live: dict[str, Request] = {}  # submitted and not finished, by request_id
        self._calls: dict[int, Callable] = {}  # call id -> what to do with the core's reply
        self._ids = itertools.count()
        # Every send goes through one sender thread: the output thread (a stop string's cancel) must never block
        # on a full pipe while the core blocks sending it events. It also carries cancels while the core drains.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send_loop, name="prefixtune-engine-send", daemon=True).start()
        self._counts = (0, 0)  # (waiting, running) in the core
        self._closed = False
        self._thread: threading.Thread | None = None

    def _wait_ready(self, timeout: float) -> dict:
        if not self._conn.poll(timeout):
            self.process.kill()
            raise RuntimeError(f"the engine process did not load the model within {timeout:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process exited while loading (code {self.process.exitcode})") from None
        if message[0] == "failed":
            self.process.join(5)
            raise message[1]
        return message[1]

    # ---- the Scheduler's interface ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._receive, name="prefixtune-output", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.is_alive()

    @property
    def waiting(self) -> int:
        return self._counts[0]

    @property
    def running(self) -> int:
        return self._counts[1]

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def submit(self, request: Request) -> str:
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[str]:
        """All or none, as Scheduler.submit_many (blocking: from an event loop, await submit_remote)."""
        done, box = threading.Event(), []
        self._call(requests, lambda reply: (box.append(reply), done.set()))
        done.wait()
        return self._accepted(box[0], requests)

    async def submit_remote(self, requests: Sequence[Request]) -> list[str]:
        """submit_many without blocking the event loop on the core's answer."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._call(requests, lambda reply: loop.call_soon_threadsafe(_settle, answer, reply))
        try:
            reply = await asyncio.shield(answer)
        except asyncio.CancelledError:  # the client left before the answer: the rows must not run unheard
            for r in requests:
                self.cancel(r.request_id)
            raise
        return self._accepted(reply, requests)

    def cancel(self, request_id: str) -> bool:
        """A waiting row leaves the queue, a running one before the next step (also a stop string found here)."""
        if request_id not in self._live:
            return False
        self._send(("cancel", request_id))
        return True

    def _on_stop(self, request_id: str, cancel: bool = False) -> None:
        self.cancel(request_id)  # a stop string or a broken consumer: either way the core drops the row

    def adapter_changed(self, op: str, name: str, path: str | None = None, timeout: float | None = None) -> None:
        """Mirror an admin load ("load", path or None for the store) or "unload" into the core's adapter cache.

        Call it outside any lock generation requests take: it waits for the core (up to `timeout` s, default
        ADAPTER_TIMEOUT_S) and raises RuntimeError at once when the core is gone, or when it fails or is too slow.
        """
        if not self.alive:
            raise RuntimeError(f"the engine process is not running ({self.error or 'closed'}); cannot {op} "
                               f"adapter {name!r}")
        done, box = threading.Event(), []
        call = next(self._ids)
        self._calls[call] = lambda reply: (box.append(reply), done.set())
        self._send(("adapter", call, op, name, path))
        if not done.wait(ADAPTER_TIMEOUT_S if timeout is None else timeout):
            self._calls.pop(call, None)
            raise RuntimeError(f"the engine process did not {op} adapter {name!r} within "
                               f"{ADAPTER_TIMEOUT_S if timeout is None else timeout:.0f} s")
        if box[0] is not None:
            raise RuntimeError(f"the engine process could not {op} adapter {name!r}: {box[0][1]}")

    def shutdown(self, timeout: float = 10.0, drain: bool = True) -> bool:
        """Refuse new requests; the core lets in-flight ones finish for up to `timeout` s, aborts the rest, exits."""
        self._closed = True
        if self._thread is None:  # never started: nothing in flight, nobody to read its goodbye
            self.process.kill()
            self.process.join(5)
            return True
        self._send(("shutdown", timeout, drain))
        self.process.join(timeout + 15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        if self._thread is not None:
            self._thread.join(5)
        return True

    # ---- plumbing -----------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        self._outbox.put(message)

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:  # the core said goodbye
                return
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the core is gone; the receiver fails what was in flight
                return

    def _call(self, requests: Sequence[Request], on_reply: Callable) -> None:
        if self._closed:
            raise SchedulerClosed("the server is shutting down")
        call = next(self._ids)
        self._calls[call] = on_reply
        for r in requests:  # before sending: the core's first events may beat its reply
            self._live[r.request_id] = r
        rows = [(r.request_id, r.prompt_ids, r.params, r.adapter, r.negative,
                 None if r.experts is None else r.experts.spec()) for r in requests]
        self._send(("submit", call, rows))

    def _accepted(self, reply, requests: Sequence[Request]) -> list[str]:
        if reply is None:
            return [r.request_id for r in requests]
        for r in requests:
            self._live.pop(r.request_id, None)
        kind, message = reply
        if kind == "queue_full":
            raise QueueFull(message)
        if kind == "closed":
            raise SchedulerClosed(message)
        if kind == "invalid":
            raise ValueError(message)
        if kind == "adapter":
            raise RuntimeError(f"the engine process could not load the adapter: {message}")
        raise RuntimeError(f"the engine process could not take the request: {message}")

    def _receive(self) -> None:  # the output thread: the core's messages, in order
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "events":
                    self._events(message[1], message[2])
                elif kind == "reply":
                    on_reply = self._calls.pop(message[1], None)  # None: its caller gave up waiting
                    if on_reply is not None:
                        _answer(on_reply, message[2])
                elif kind == "stopped":
                    self._outbox.put(None)
                    self._conn.close()  # the core's command loop sees EOF and its process exits
                    return
        except (EOFError, OSError):
            pass
        finally:
            self._closed = True
            self.process.join(1)  # reaped, so the message can say how it ended
            self._fail_live(RetryableError(f"the engine process exited (code {self.process.exitcode}); retry in a "
                                           "few seconds"))

    def carry_counters(self, earlier: SchedulerStats) -> None:
        """Count on from a dead core's totals: a new core starts from 0, and Prometheus counters never drop."""
        self._carried = {name: getattr(earlier, name) for name in STAT_FIELDS if name != "last_batch_size"}

    def _events(self, rows, stats) -> None:
        counters, self._counts, recent = stats
        for name, value in zip(STAT_FIELDS, counters):
            carried = self._carried.get(name, 0)
            setattr(self.stats, name, max(carried, value) if name.startswith("max_") else carried + value)
        self.stats.recent.extend(recent)
        events = []
        for request_id, token, finish, error, beams, logprob, prompt, stop_token, score in rows:
            request = self._live.get(request_id)
            if request is None:
                continue
            if finish is not None or beams is not None:  # the core's last word on this request
                del self._live[request_id]
            events.append(RowEvent(request, token, finish, error, beams, logprob, prompt, stop_token, score))
        self.output.process(events)

    def _fail_live(self, message: str) -> None:  # a RetryableError when the process died
        live, self._live = list(self._live.values()), {}
        self.error = message if live else self.error
        self.output.process([RowEvent(r, finish="error", error=message) for r in live])
        for on_reply in list(self._calls.values()):  # a submit waiting for an answer that will never come
            _answer(on_reply, ("closed", message))
        self._calls.clear()


def _shell(spec: EngineSpec, dtype=None):
    from prefixtune.models import load_shell, resolve_device_dtype

    return load_shell(spec.model, dtype or resolve_device_dtype(spec.device, spec.dtype)[1], fingerprint="")


def _front_lm(spec: EngineSpec, shell, info: dict):
    """The front end's PrefixLM over the shell, stamped with the core's fingerprint (adapters are checked on it)."""
    import torch

    from prefixtune.engine.lm import PrefixLM
    from prefixtune.fingerprint import remember_legacy

    dtype = getattr(torch, info["dtype"])
    if shell.dtype != dtype:  # the core settled on another dtype than the flags said: match it
        shell = _shell(spec, dtype)
    shell.fingerprint, shell.legacy_fingerprint = info["fingerprint"], info["legacy_fingerprint"]
    if info["legacy_fingerprint"]:
        remember_legacy(info["fingerprint"], info["legacy_fingerprint"])
    return PrefixLM(shell, spec.store, force=spec.force)


def _answer(on_reply: Callable, reply) -> None:
    try:
        on_reply(reply)
    except RuntimeError:  # the waiting event loop is closed: nobody listens any more
        pass


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
