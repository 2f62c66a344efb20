"""Serving engine: request queue -> policy -> model runner -> output processor (continuous batching).

The layout follows vLLM v1. Each iteration of the worker thread:
  1. the policy (engine/policy.py) decides which requests leave and which join, and returns a Schedule;
  2. the model runner (engine/runner.py) drops the leaving rows and prefills the joining ones into its
     per-slot KV buffers (each costs O(its own rows));
  3. the running rows' logits are combined for guided groups (engine/guidance.py) and sampled in one
     vectorised call (engine/sampling.py), beam groups advance their searches (engine/beam_group.py), EOS
     and max_new_tokens are applied, and the token ids go to the output processor (engine/output.py), which
     detokenizes and matches stop strings on its own thread;
  4. the runner decodes one step for all running rows.
`Scheduler` is the facade the server and tests use: submit/cancel/shutdown from any thread, outputs arrive
via Request.emit on the output thread. Before start() (tests, benchmarks) run_once() does one iteration and
the outputs are processed inline. No HTTP here: a server bridges Request.emit to its event loop.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixtune.engine.beam import BeamSearch
from prefixtune.engine.beam_group import new_search, step_groups
from prefixtune.engine.guidance import guided_logits
from prefixtune.engine.output import OutputProcessor, RowEvent
from prefixtune.engine.policy import MODES, BatchPolicy, rows_of
from prefixtune.engine.runner import ModelRunner
from prefixtune.engine.requests import Output, QueueFull, Request, SchedulerClosed, SchedulerStats
from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows

__all__ = ["MODES", "Output", "QueueFull", "Request", "Scheduler", "SchedulerClosed", "SchedulerStats", "cost"]


@dataclass
class _Running:
    request: Request
    sampler: RowSampler
    search: BeamSearch | None = None  # a beam request's search state (engine/beam_group.py)
    generated: int = 0  # tokens sampled (EOS not counted)


class Scheduler:
    """Owns the worker thread, the policy, the model runner and the output processor."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 256, mode: str = "continuous",
                 max_model_len: int | None = None, start: bool = True, max_inflight_tokens: int = 1 << 19,
                 output=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_batch < 1 or max_queue < 1:  # every request passes through the queue: 0 would refuse all
            raise ValueError("max_batch and max_queue must be >= 1")
        if max_inflight_tokens < 1:
            raise ValueError("max_inflight_tokens must be >= 1")
        self.lm = lm
        self.model = lm.model
        self.max_batch, self.max_queue, self.mode = max_batch, max_queue, mode
        self.max_model_len = max_model_len
        self.max_inflight_tokens = max_inflight_tokens  # prompt + max_new_tokens over all in-flight rows
        self.policy = BatchPolicy(max_batch, mode)
        self.runner = ModelRunner(self.model, max_batch)
        pad = lm.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (lm.tokenizer.eos_token_id or 0))
        self.eos_ids = set(lm.eos_ids())
        self.lm_lock = threading.RLock()  # guards lm's adapter LRU (worker, admin endpoints, resolvers)
        self.stats = SchedulerStats()
        # A fast tokenizer must not be used from two threads at once ("Already borrowed"): the output thread
        # decodes with its own copy while the server encodes with lm.tokenizer. An engine process passes its own
        # sink (engine/core.py: RowEvents go to the front end, which detokenizes).
        self.output = output or OutputProcessor(copy.deepcopy(lm.tokenizer), self.stats, self._on_stop)
        self._layout_tokenizer = copy.deepcopy(lm.tokenizer)  # the worker's own, for lm.layout_mask()
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._live: dict[str, Request] = {}  # waiting + running, by request_id
        self._inflight_tokens = 0  # sum of cost() over _live
        self._running: dict[str, _Running] = {}  # worker thread only; insertion = admission order
        self._closed = False  # no new submissions
        self._stop = False  # worker exits after aborting what is left
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # last worker failure (the worker survives it)
        if start:
            self.start()

    # ---- client side (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self.output.start()
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
        return len(self._running)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (waiting, being prefilled, or running)."""
        return len(self._live)

    @property
    def inflight_tokens(self) -> int:
        return self._inflight_tokens

    def submit(self, request: Request) -> str:
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[str]:
        """Queue all requests or none (a request with n choices must not be half-admitted)."""
        for r in requests:
            r.params.validate()
            if not r.prompt_ids:
                raise ValueError("prompt is empty: at least one token is needed")
            if rows_of(r) > self.max_batch:
                what = "a guided request" if r.params.guided else f"num_beams={r.params.num_beams}"
                raise ValueError(f"{what} needs {rows_of(r)} batch rows but max_batch is {self.max_batch}")
            self._check_length(r)
        need = sum(cost(r) for r in requests)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"queue full ({len(self._waiting)} waiting, max_queue={self.max_queue})")
            if self._inflight_tokens + need > self.max_inflight_tokens:
                raise QueueFull(f"{self._inflight_tokens} tokens in flight + {need} requested exceed "
                                f"max_inflight_tokens={self.max_inflight_tokens}")
            for r in requests:
                self._waiting.append(r)
                self._live[r.request_id] = r
            self._inflight_tokens += need
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
                self._forget(request)
        if queued:  # its final Output (and the stats) come from the output processor's thread
            self.output.put([RowEvent(request, finish="cancelled")])
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
        self.output.close(max(0.0, deadline - time.monotonic()) + 1.0)
        return not self._thread.is_alive()

    def _on_stop(self, request_id: str) -> None:  # output thread: a stop string ended the request
        request = self._live.get(request_id)
        if request is not None:
            request.stopped = True

    # ---- worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._stop):
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the server
                self._fail_running(f"{type(exc).__name__}: {exc}")
        self._abort_all()

    def run_once(self) -> bool:
        """One iteration: release, admit, sample, decode. Returns whether work is left."""
        with self._cv:
            plan = self.policy.schedule(self._waiting, [r.request for r in self._running.values()])
            for r in plan.admit:
                self._waiting.remove(r)
        events: list[RowEvent] = []
        for r in plan.release:
            self._release(r)
            if r.cancelled and not r.stopped:
                events.append(RowEvent(r, finish="cancelled"))
        if plan.admit:
            events += self._admit(plan.admit)
        if self._running:
            events += self._sample_and_decode()
        self.output.put(events)
        return bool(self._running or self._waiting)

    def _release(self, request: Request) -> None:
        self._running.pop(request.request_id, None)
        for key in _keys(request):
            if key in self.runner.order:
                self.runner.remove(key)
        with self._cv:
            self._forget(request)

    def _forget(self, request: Request) -> None:  # holding _cv
        if self._live.pop(request.request_id, None) is not None:
            self._inflight_tokens -= cost(request)

    def _admit(self, requests: list[Request]) -> list[RowEvent]:
        device = self.runner.device
        events, keys, prompts, prefixes, joined = [], [], [], [], []
        for r in requests:
            try:  # everything that can fail for one request alone happens here, before it joins the batch
                prefix, negative = self._prefixes(r)
                state = _Running(r, RowSampler(r.params, device), new_search(r, self.eos_ids, device))
            except Exception as exc:  # noqa: BLE001 - an unloadable adapter or bad setting fails only its request
                with self._cv:
                    self._forget(r)
                events.append(RowEvent(r, finish="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            joined.append(state)
            # A guided pair's second row is the negative; every beam of a group carries the adapter's prefix.
            for key, kv in zip(_keys(r), (prefix, negative) if r.params.guided else [prefix] * rows_of(r)):
                keys.append(key)
                prompts.append(r.prompt_ids)
                prefixes.append(kv)
        if not joined:
            return events
        try:
            self.runner.add(keys, prompts, prefixes, self.pad_id)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: fail the newcomers, keep the batch
            for key in keys:
                if key in self.runner.order:
                    self.runner.remove(key)
            for state in joined:
                with self._cv:
                    self._forget(state.request)
                events.append(RowEvent(state.request, finish="error", error=f"{type(exc).__name__}: {exc}"))
            return events
        self.stats.prefills += 1
        self.stats.prompt_tokens += sum(len(s.request.prompt_ids) for s in joined)
        for state in joined:
            self._running[state.request.request_id] = state
        return events

    def _prefixes(self, r: Request) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        prefix, negative = r.prefix, r.negative_prefix
        if prefix is None and r.adapter is not None:
            with self.lm_lock:
                prefix = self.lm.adapter(r.adapter).kv
        if r.params.guided and negative is None and r.negative is not None:
            with self.lm_lock:
                negative = self.lm.adapter(r.negative).kv
        virtual = max(0 if p is None else int(p.shape[2]) for p in (prefix, negative))
        self._check_length(r, virtual)
        return prefix, negative

    def _sample_and_decode(self) -> list[RowEvent]:
        runner = self.runner
        logits = runner.current_logits()  # (B, V), slot order: sampled in place, no gather of the batch
        slot = {key: i for i, key in enumerate(runner.order)}
        guided = [s for s in self._running.values() if s.request.params.guided]
        if guided:
            rows = torch.tensor([slot[(s.request.request_id, 0)] for s in guided], device=logits.device)
            uncond = torch.tensor([slot[(s.request.request_id, 1)] for s in guided], device=logits.device)
            scale = torch.tensor([s.request.params.guidance_scale for s in guided], device=logits.device)
            # As offline generation: EOS and layout tokens keep the adapter's own probabilities.
            with self.lm_lock:
                layout = self.lm.layout_mask(self._layout_tokenizer)
            combined = guided_logits(logits.index_select(0, rows), logits.index_select(0, uncond), scale,
                                     eos_ids=sorted(self.eos_ids), layout=layout)  # (G, V)
            logits = logits.index_copy(0, rows, combined)  # (B, V); companions' own rows are never used
        # Companion rows take their group's token; a greedy placeholder sampler keeps the call vectorised.
        samplers = [self._running[key[0]].sampler if key[1] == 0 else _COMPANION for key in runner.order]
        tokens = sample_rows(logits, samplers)
        token_of = {key[0]: tokens[i] for i, key in enumerate(runner.order) if key[1] == 0}
        groups = [s for s in self._running.values() if s.search is not None]
        beam_tokens, moves, ended = step_groups(groups, logits, slot) if groups else ({}, [], [])
        events, leaving = [], []
        for state in ended:
            events.append(RowEvent(state.request, beams=state.search.results[0]))
            leaving.append(state.request)
        live_groups = sum(1 for s in groups if not s.request.cancelled) - len(ended)
        self.stats.generated_tokens += live_groups  # a beam group's step is one token of its request
        for state in self._running.values():
            request, params = state.request, state.request.params
            if request.cancelled or request.stopped or state.search is not None:
                continue  # leaves at the next iteration (the token is not emitted), or a beam group (above)
            token = token_of[request.request_id]
            if token in self.eos_ids and not params.ignore_eos:
                events.append(RowEvent(request, finish="stop"))
                leaving.append(request)
                continue
            state.generated += 1
            self.stats.generated_tokens += 1
            done = state.generated >= params.max_new_tokens
            events.append(RowEvent(request, token, "length" if done else None))
            if done:
                leaving.append(request)
        self._record_step(len(runner), sum(1 for e in events if e.token is not None) + live_groups)
        for request in leaving:
            self._release(request)
        if len(runner):
            runner.reorder(moves)
            runner.decode([beam_tokens.get(key, token_of[key[0]]) for key in runner.order])
        return events

    def _record_step(self, rows: int, produced: int) -> None:
        s = self.stats
        s.steps += 1
        s.step_rows += rows
        s.last_batch_size = rows
        s.max_batch_size = max(s.max_batch_size, rows)
        adapters = {r.request.adapter for r in self._running.values()}
        s.max_adapters_in_batch = max(s.max_adapters_in_batch, len(adapters))
        s.mixed_steps += len(adapters) > 1
        s.recent.append((time.monotonic(), produced))

    def _fail_running(self, message: str) -> None:
        self.error = message
        states = list(self._running.values())
        self._running.clear()
        self.runner.clear()
        events = []
        for state in states:
            with self._cv:
                self._forget(state.request)
            events.append(RowEvent(state.request, finish="error", error=message))
        self.output.put(events)

    def _abort_all(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            for r in waiting:
                self._forget(r)
        states = list(self._running.values())
        self._running.clear()
        self.runner.clear()
        for state in states:
            with self._cv:
                self._forget(state.request)
        self.output.put([RowEvent(r, finish="abort") for r in waiting]
                        + [RowEvent(s.request, finish="abort") for s in states])

    def _check_length(self, r: Request, prefix_len: int | None = None) -> None:
        if self.max_model_len is None:
            return
        if prefix_len is None:
            prefix_len = max(0 if p is None else int(p.shape[2]) for p in (r.prefix, r.negative_prefix))
        need = prefix_len + len(r.prompt_ids) + r.params.max_new_tokens
        if need > self.max_model_len:
            raise ValueError(
                f"{prefix_len} virtual + {len(r.prompt_ids)} prompt + {r.params.max_new_tokens} new tokens = "
                f"{need} > max_model_len {self.max_model_len}"
            )


_COMPANION = RowSampler(SamplingParams(), torch.device("cpu"))  # greedy: no generator, any device


def _keys(request: Request) -> list[tuple[str, int]]:
    """Runner row keys of a request: (id, 0) its own row, (id, 1) a guided request's unconditioned row,
    (id, j) beam j of a beam group."""
    return [(request.request_id, i) for i in range(rows_of(request))]


def cost(request: Request) -> int:
    """Batch room a request holds while in flight: prompt + max_new_tokens on each of its rows."""
    return rows_of(request) * (len(request.prompt_ids) + request.params.max_new_tokens)
