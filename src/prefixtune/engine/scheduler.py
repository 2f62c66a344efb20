"""Serving scheduler: request queue -> running batch -> decode steps -> per-request outputs.

Iteration-level (continuous) batching: between two decode steps the worker admits waiting requests (prefilled
together as one RunningBatch, then merged into the running one) and drops rows that finished or were
cancelled, so a short request never waits for a long one and a free slot is refilled at once. Every row keeps
its own adapter prefix; prefixes of different lengths mix (RunningBatch pads and masks them).
`mode="grouped"` is the simpler policy — one adapter's requests batched and run to completion before the
next — kept so the benchmark can measure what continuous batching buys.

No HTTP here: a server bridges `Request.emit` (called on the worker thread) to its event loop.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prefixtune.engine.decode import RunningBatch
from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows
from prefixtune.engine.text import TextTracker

MODES = ("continuous", "grouped")
FINISH_REASONS = ("stop", "length", "cancelled", "abort", "error")


class QueueFull(RuntimeError):
    """More waiting requests than max_queue; the caller should retry later (HTTP 429)."""


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


@dataclass
class Output:
    """What one decode iteration produced for one request (emitted on the worker thread)."""

    request_id: str  # Request.request_id
    text: str  # new text since the previous output (text that may start a stop string is held back)
    token_ids: list[int]  # new token ids (EOS is never included)
    finish_reason: str | None  # None while running; stop | length | cancelled | abort | error
    completion_tokens: int  # tokens generated so far
    error: str | None = None  # message when finish_reason == "error"


def _ignore(_: Output) -> None:
    return None


@dataclass
class Request:
    """One generation row: a tokenized prompt, its adapter and how to sample."""

    prompt_ids: list[int]  # tokenized prompt (no padding)
    adapter: str | None  # adapter name (None = base model); labels stats and resolves `prefix` if unset
    params: SamplingParams  # per-row sampling, stop strings, max new tokens
    emit: Callable[[Output], None] = _ignore  # receives every Output, on the worker thread; must not block
    prefix: torch.Tensor | None = None  # folded kv (2L, kv_heads, P, head_dim); None: lm.adapter(adapter).kv
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # handle for cancel()
    cancelled: bool = False  # set by Scheduler.cancel; the worker drops the row before its next step


@dataclass
class _Row:
    request: Request
    sampler: RowSampler
    text: TextTracker
    generated: int = 0  # tokens generated (EOS not counted)


@dataclass
class SchedulerStats:
    """Counters the metrics endpoint and the benchmark read (written by the worker only)."""

    steps: int = 0  # decode steps (one forward of the running batch)
    step_rows: int = 0  # sum of batch sizes over steps (mean batch size = step_rows / steps)
    last_batch_size: int = 0  # rows in the latest decode step
    max_batch_size: int = 0  # most rows ever decoded together
    max_adapters_in_batch: int = 0  # most distinct adapters (None counted) ever sharing one step
    prefills: int = 0  # prefill forwards (each admits one or more rows)
    prompt_tokens: int = 0  # prompt tokens prefilled
    generated_tokens: int = 0  # tokens sampled (EOS excluded)
    # Finished rows by finish_reason; every key exists from the start, so a reader on another thread never
    # iterates while the worker inserts.
    finished: Counter = field(default_factory=lambda: Counter(dict.fromkeys(FINISH_REASONS, 0)))
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens) per step

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds (0 when idle)."""
        now = time.monotonic()
        items = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not items:
            return 0.0
        span = max(now - items[0][0], 1e-3)
        return sum(n for _, n in items) / span


class Scheduler:
    """Owns the running batch and a worker thread; submit() from any thread, outputs arrive via Request.emit."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 256, mode: str = "continuous",
                 max_model_len: int | None = None, start: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_batch < 1 or max_queue < 1:  # every request passes through the queue: 0 would refuse all
            raise ValueError("max_batch and max_queue must be >= 1")
        self.lm = lm
        self.model = lm.model
        self.max_batch, self.max_queue, self.mode = max_batch, max_queue, mode
        self.max_model_len = max_model_len
        # A fast tokenizer must not be used from two threads at once ("Already borrowed"); the worker
        # decodes with its own copy while the server encodes with lm.tokenizer.
        self.tokenizer = copy.deepcopy(lm.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.eos_ids = set(lm.eos_ids())
        self.lm_lock = threading.RLock()  # guards lm's adapter LRU (worker, admin endpoints, resolvers)
        self.stats = SchedulerStats()
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._live: dict[str, Request] = {}  # waiting + running, by request_id
        self._rows: list[_Row] = []  # running rows, in batch order (worker thread only)
        self._batch: RunningBatch | None = None
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of the running rows
        self._closed = False  # no new submissions
        self._stop = False  # worker exits after aborting what is left
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # last worker failure (the worker survives it)
        if start:
            self.start()

    # ---- client side (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prefixtune-scheduler", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (waiting, being prefilled, or running)."""
        return len(self._live)

    def submit(self, request: Request) -> str:
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[str]:
        """Queue all rows or none (a request with n choices must not be half-admitted)."""
        for r in requests:
            r.params.validate()
            if not r.prompt_ids:
                raise ValueError("prompt is empty: at least one token is needed")
            self._check_length(r)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"queue full ({len(self._waiting)} waiting, max_queue={self.max_queue})")
            for r in requests:
                self._waiting.append(r)
                self._live[r.request_id] = r
            self._cv.notify_all()
        return [r.request_id for r in requests]

    def cancel(self, request_id: str) -> bool:
        """Stop a request: a waiting one leaves the queue now, a running one before the next step."""
        with self._cv:
            request = self._live.get(request_id)
            if request is None:
                return False
            request.cancelled = True
            queued = request in self._waiting
            if queued:
                self._waiting.remove(request)
                self._live.pop(request_id, None)
        if queued:
            self._finish(request, "cancelled", 0)
        return True

    def shutdown(self, timeout: float = 10.0, drain: bool = True) -> bool:
        """Refuse new requests; let in-flight ones finish for up to `timeout` s (drain), then abort the rest.

        Returns whether the worker stopped within the time (it may be inside one forward pass).
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if drain and self._thread is not None:
            while self._live and time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is None:
            self._abort_all()
            return True
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        return not self._thread.is_alive()

    # ---- worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._rows or self._stop):
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the server
                self._fail_running(f"{type(exc).__name__}: {exc}")
        self._abort_all()

    def run_once(self) -> bool:
        """One scheduling iteration: admit, then one decode step. Returns whether work is left."""
        admitted = self._take()
        if admitted:
            self._admit(admitted)
        if self._rows:
            self._decode()
        return bool(self._rows or self._waiting)

    def _take(self) -> list[Request]:
        with self._cv:
            room = self.max_batch - len(self._rows)
            if self.mode == "grouped":
                if self._rows or not self._waiting:
                    return []  # the running group finishes before the next starts
                adapter = self._waiting[0].adapter
                taken = [r for r in self._waiting if r.adapter == adapter][:room]
                for r in taken:
                    self._waiting.remove(r)
                return taken
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _admit(self, requests: list[Request]) -> None:
        device = next(self.model.parameters()).device
        ready, prefixes, rows = [], [], []
        for r in requests:
            try:  # everything that can fail for one request alone happens here, before it joins a batch
                prefix = r.prefix
                if prefix is None and r.adapter is not None:
                    with self.lm_lock:
                        prefix = self.lm.adapter(r.adapter).kv
                    self._check_length(r, int(prefix.shape[2]))
                row = _Row(r, RowSampler(r.params, device), TextTracker(self.tokenizer, r.params.stop))
            except Exception as exc:  # noqa: BLE001 - an unloadable adapter or bad setting fails only its request
                self._finish(r, "error", 0, f"{type(exc).__name__}: {exc}")
                continue
            ready.append(r)
            prefixes.append(prefix)
            rows.append(row)
        if not ready:
            return
        width = max(len(r.prompt_ids) for r in ready)
        ids = torch.full((len(ready), width), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(ready), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(ready):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        try:
            batch, logits = RunningBatch.prefill(self.model, ids.to(device), mask.to(device), prefixes)
            if self._batch is not None:
                merged = torch.cat([self._logits, logits])  # (B_running + B_new, V)
                self._batch.merge(batch)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: fail the newcomers, keep the batch
            for r in ready:
                self._finish(r, "error", 0, f"{type(exc).__name__}: {exc}")
            return
        self.stats.prefills += 1
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in ready)
        if self._batch is None:
            self._batch, self._logits = batch, logits
        else:
            self._logits = merged
        self._rows.extend(rows)

    def _decode(self) -> None:
        rows = self._rows
        tokens = sample_rows(self._logits, [row.sampler for row in rows])
        before = self.stats.generated_tokens
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens)) if self._advance(row, token)]
        self._record_step(len(rows), self.stats.generated_tokens - before)
        if not keep:
            self._rows, self._batch, self._logits = [], None, None
            return
        if len(keep) < len(rows):
            self._batch.select(keep)
            self._rows = [rows[i] for i in keep]
        device = self._batch.mask.device
        self._logits = self._batch.step(torch.tensor([tokens[i] for i in keep], device=device))

    def _advance(self, row: _Row, token: int) -> bool:
        """Apply one sampled token to a row and emit; returns whether the row stays in the batch."""
        request, params = row.request, row.request.params
        if request.cancelled:
            self._finish(request, "cancelled", row.generated)
            return False
        if token in self.eos_ids and not params.ignore_eos:
            self._finish(request, "stop", row.generated, text=row.text.flush())
            return False
        row.generated += 1
        self.stats.generated_tokens += 1
        text, stopped = row.text.push(token)
        reason = "stop" if stopped else ("length" if row.generated >= params.max_new_tokens else None)
        if reason == "length":
            text += row.text.flush()
        if reason is None:
            self._emit(request, Output(request.request_id, text, [token], None, row.generated))
            return True
        self._finish(request, reason, row.generated, text=text, token_ids=[token])
        return False

    def _record_step(self, size: int, produced: int) -> None:
        s = self.stats
        s.steps += 1
        s.step_rows += size
        s.last_batch_size = size
        s.max_batch_size = max(s.max_batch_size, size)
        s.max_adapters_in_batch = max(s.max_adapters_in_batch, len({r.request.adapter for r in self._rows}))
        s.recent.append((time.monotonic(), produced))

    def _finish(self, request: Request, reason: str, generated: int, error: str | None = None,
                text: str = "", token_ids: list[int] | None = None) -> None:
        with self._cv:
            self._live.pop(request.request_id, None)
        self.stats.finished[reason] += 1
        self._emit(request, Output(request.request_id, text, token_ids or [], reason, generated, error))

    @staticmethod
    def _emit(request: Request, output: Output) -> None:
        try:
            request.emit(output)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the other rows
            request.cancelled = True

    def _fail_running(self, message: str) -> None:
        self.error = message
        rows, self._rows, self._batch, self._logits = self._rows, [], None, None
        for row in rows:
            self._finish(row.request, "error", row.generated, message)

    def _abort_all(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        rows, self._rows, self._batch, self._logits = self._rows, [], None, None
        for request in waiting:
            self._finish(request, "abort", 0)
        for row in rows:
            self._finish(row.request, "abort", row.generated, text=row.text.flush())

    def _check_length(self, r: Request, prefix_len: int | None = None) -> None:
        if self.max_model_len is None:
            return
        if prefix_len is None:
            prefix_len = 0 if r.prefix is None else int(r.prefix.shape[2])
        need = prefix_len + len(r.prompt_ids) + r.params.max_new_tokens
        if need > self.max_model_len:
            raise ValueError(
                f"{prefix_len} virtual + {len(r.prompt_ids)} prompt + {r.params.max_new_tokens} new tokens = "
                f"{need} > max_model_len {self.max_model_len}"
            )
