"""The engine (vLLM v1's EngineCore + Scheduler): request queue -> schedule -> model runner -> output processor.

One step (`run_once`):
  1. `schedule()`: the policy (engine/policy.py) decides which requests leave and which join, and how many
     prompt tokens of the joining ones run this step within the step's token budget (chunked prefill);
  2. `runner.execute()` (engine/runner.py): the decode forward of the running rows, the prefill chunks, then
     the sampler (engine/sampler.py: guidance, per-row sampling, beam steps) over every running row;
  3. `update_from_output()`: EOS, max_new_tokens, finished beam searches and failed rows become RowEvents for the
     output processor (engine/output.py), which detokenizes and matches stop strings (on its own thread when
     the scheduler runs one).
Every decode path steps this one engine: the server's worker thread (`start()`), the engine process
(engine/core.py), and offline generation, eval and compare, which step it synchronously in the caller's
thread (engine/offline.py), as vLLM's `LLM` drives the EngineCore the server uses.
`Scheduler` is the facade: submit/cancel/shutdown from any thread (they only touch the queue and the abort
set, under one lock); everything else belongs to the thread that steps. Outputs arrive via Request.emit.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

from prefixtune.engine.admission import check_request, cost, resolve_prefixes
from prefixtune.engine.output import OutputProcessor, RowEvent
from prefixtune.engine.policy import MODES, BatchPolicy, Schedule, chunks, prefill_rows, step_tokens
from prefixtune.engine.requests import Output, QueueFull, Request, SchedulerClosed, SchedulerStats
from prefixtune.engine.runner import ModelRunner, logits_width
from prefixtune.engine.sampler import Group, Sampler, new_group
from prefixtune.engine.structured import Grammars

__all__ = ["MODES", "Output", "QueueFull", "Request", "Scheduler", "SchedulerClosed", "SchedulerStats"]


class Scheduler:
    """Owns the policy, the model runner and the output processor, and the worker thread when started."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 256, mode: str = "continuous",
                 max_model_len: int | None = None, start: bool = True, max_inflight_tokens: int = 1 << 19,
                 output=None, max_step_tokens: int | str | None = None, lora=None):
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
        self.eos_ids = set(lm.eos_ids())
        self.runner = ModelRunner(self.model, max_batch, Sampler(self.eos_ids, self._layout), lora=lora,
                                  compiled=getattr(lm, "compiled_decode", None))
        # decode rows + prefill tokens per step ("auto": by device, engine/policy.py; None: prompts join whole)
        self.max_step_tokens = step_tokens(max_step_tokens, self.runner.device.type)
        self.lm_lock = threading.RLock()  # guards lm's adapter LRU (worker, admin endpoints, resolvers)
        self.width = logits_width(self.model)
        # Structured outputs compile on the submitting thread (never the stepping one), cached by spec.
        self.grammars = Grammars(lm.tokenizer, self.width, self.eos_ids)
        self.stats = SchedulerStats()
        # An engine process passes its own sink (engine/core.py: RowEvents go to the front end, which detokenizes).
        # Stepped in the caller's thread (offline), the output processor shares lm.tokenizer; start() gives its
        # thread a copy.
        self.output = output or OutputProcessor(lm.tokenizer, self.stats, self._on_stop)
        self._layout_tokenizer = None  # the worker thread's own copy, made on first use
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._live: dict[str, Request] = {}  # waiting + admitted, by request_id
        self._inflight_tokens = 0  # sum of cost() over _live
        self._aborts: dict[str, str] = {}  # request id -> "cancel" | "stop", applied by the next schedule()
        self._groups: dict[str, Group] = {}  # admitted requests (prefilling or running); insertion = admission
        self._closed = False  # no new submissions
        self._stop = False  # worker exits after aborting what is left
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # last step failure (the engine survives it)
        if start:
            self.start()

    # ---- client side (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            # A fast tokenizer must not be used from two threads at once ("Already borrowed"): the output thread
            # decodes with its own copy while the server encodes with lm.tokenizer.
            if getattr(self.output, "tokenizer", None) is self.lm.tokenizer:
                self.output.tokenizer = copy.deepcopy(self.lm.tokenizer)
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
        return len(self._groups)

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
            check_request(r, self.max_batch, self.max_model_len, self.width, self.grammars)
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
            queued = request in self._waiting  # identity: Request is eq=False
            if queued:
                request.cancelled = True
                self._waiting.remove(request)
                self._forget(request)
            else:
                self._aborts[request_id] = "cancel"
                self._cv.notify_all()
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

    def _on_stop(self, request_id: str, cancel: bool = False) -> None:
        """The output processor's word: a stop string ended the request (or its consumer broke: cancel it)."""
        if cancel:
            self.cancel(request_id)
            return
        with self._cv:
            if request_id in self._live:
                self._aborts[request_id] = "stop"

    # ---- worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._groups or self._aborts or self._stop):
                    self._cv.wait()
                if self._stop:
                    break
            self.run_once()
        self._abort_all()

    def run_once(self) -> bool:
        """One step: schedule, execute (forward passes and sampling), update. Returns whether work is left.

        Whatever happens, the step's events reach the output processor: a request never waits for an output
        that a failed step dropped."""
        events: list[RowEvent] = []
        schedule = None
        try:
            schedule = self.schedule()
            events += self._apply(schedule)
            prefill = [(self._groups[r.request_id], n) for r, n in schedule.prefill if r.request_id in self._groups]
            out = self.runner.execute(prefill, self._groups)
            events += self.update_from_output(out)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the engine
            events += self._fail_admitted(f"{type(exc).__name__}: {exc}", schedule)
        finally:
            self.output.put(events)
        return bool(self._groups or self._waiting)

    def schedule(self) -> Schedule:
        """Which requests leave and join, and this step's prefill chunks (engine/policy.py)."""
        with self._cv:
            aborts, self._aborts = self._aborts, {}
            for request_id, why in aborts.items():
                group = self._groups.get(request_id)
                if group is not None:
                    setattr(group.request, "stopped" if why == "stop" else "cancelled", True)
            plan = self.policy.schedule(self._waiting, [g.request for g in self._groups.values()])
            for r in plan.admit:
                self._waiting.remove(r)
        runner, pending = self.runner, []
        for group in self._groups.values():
            key = group.prefill_keys[0]
            if key in runner.prefilling and not (group.request.cancelled or group.request.stopped):
                pending.append((group.request, len(group.prefill_keys), runner.remaining(key)))
        pending += [(r, prefill_rows(r), len(r.prompt_ids)) for r in plan.admit]
        plan.prefill = chunks(pending, self.max_step_tokens, len(runner.running))
        return plan

    def _apply(self, schedule: Schedule) -> list[RowEvent]:
        """Release the leaving requests, and make the joining ones groups whose rows start prefilling."""
        events = []
        for r in schedule.release:
            self._release(r)
            if r.cancelled and not r.stopped:
                events.append(RowEvent(r, finish="cancelled"))
        joining = []
        for r in schedule.admit:
            try:  # everything that can fail for one request alone happens here, before it takes a row
                prefixes = resolve_prefixes(r, self.lm, self.lm_lock, self.max_model_len)
                group = new_group(r, self.eos_ids, self.runner.device)
            except Exception as exc:  # noqa: BLE001 - an unloadable adapter or bad setting fails only its request
                with self._cv:
                    self._forget(r)
                events.append(RowEvent(r, finish="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            self._groups[r.request_id] = group
            joining.append((group, prefixes))
        if joining:
            self.runner.admit(joining)
        return events

    def update_from_output(self, out) -> list[RowEvent]:
        """Finish rules (EOS, max_new_tokens, beam searches ending, failed rows) and the step's events."""
        events, leaving = [], []
        for request_id, message in out.failed.items():
            group = self._groups.pop(request_id, None)
            if group is not None:
                with self._cv:
                    self._forget(group.request)
                events.append(RowEvent(group.request, finish="error", error=message))
        self.stats.prefills += bool(out.prefilled)
        self.stats.prompt_tokens += out.prefilled
        sampled = out.sampled
        if sampled is None:
            return events
        for group in sampled.ended:
            events.append(RowEvent(group.request, beams=group.search.results[0]))
            leaving.append(group.request)
        self.stats.generated_tokens += sampled.beam_steps  # a beam group's step is one token of its request
        for request_id, token in sampled.tokens.items():
            group = self._groups.get(request_id)
            request, params = group.request, group.request.params
            if request.cancelled or request.stopped or group.search is not None:
                continue  # leaves at the next step (the token is not emitted), or a beam group (above)
            prompt, group.prompt_logprobs = group.prompt_logprobs, None  # echo/scoring: sent with the first event
            entry = sampled.logprobs.get(request_id) if sampled.logprobs else None
            score = group.evidence if request.experts is not None else None  # a composed request's score
            if params.max_new_tokens == 0:  # only scores the prompt (SamplingParams.validate): no token wanted
                events.append(RowEvent(request, finish="length", prompt_logprobs=prompt))
                leaving.append(request)
                continue
            if token in self.eos_ids and not params.ignore_eos:
                # EOS is not text, but its log-prob is reported (as vLLM): a scorer counts on one entry per token
                events.append(RowEvent(request, finish="stop", prompt_logprobs=prompt, logprob=entry,
                                       stop_token=token if entry is not None else None, score=score))
                leaving.append(request)
                continue
            group.generated += 1
            self.stats.generated_tokens += 1
            done = group.generated >= params.max_new_tokens
            events.append(RowEvent(request, token, "length" if done else None, logprob=entry,
                                   prompt_logprobs=prompt, score=score))
            if done:
                leaving.append(request)
        self._record_step(len(sampled.row_tokens), sum(1 for e in events if e.token is not None) + sampled.beam_steps)
        for request in leaving:
            self._release(request)
        return events

    def _release(self, request: Request) -> None:
        group = self._groups.pop(request.request_id, None)
        for key in (group.keys if group is not None else []):
            if key in self.runner:
                self.runner.remove(key)
        with self._cv:
            self._forget(request)

    def _forget(self, request: Request) -> None:  # holding _cv
        if self._live.pop(request.request_id, None) is not None:
            self._inflight_tokens -= cost(request)

    def _layout(self) -> torch.Tensor:
        # A worker thread uses its own tokenizer copy: a fast tokenizer shared across threads fails.
        if self._thread is not None and self._layout_tokenizer is None:
            self._layout_tokenizer = copy.deepcopy(self.lm.tokenizer)
        with self.lm_lock:
            return self.lm.layout_mask(self._layout_tokenizer)

    def _record_step(self, rows: int, produced: int) -> None:
        s = self.stats
        s.steps += 1
        s.step_rows += rows
        s.last_batch_size = rows
        s.max_batch_size = max(s.max_batch_size, rows)
        adapters = {g.request.adapter for g in self._groups.values()}
        s.max_adapters_in_batch = max(s.max_adapters_in_batch, len(adapters))
        s.mixed_steps += len(adapters) > 1
        s.recent.append((time.monotonic(), produced))

    def _fail_admitted(self, message: str, schedule: Schedule | None) -> list[RowEvent]:
        """A step failed outside the runner's own guard: every admitted request ends with the error."""
        self.error = message
        requests = [g.request for g in self._groups.values()]
        requests += [r for r in (schedule.admit if schedule is not None else []) if r.request_id not in self._groups]
        self._groups.clear()
        self.runner.clear()
        events = []
        for request in requests:
            with self._cv:
                self._forget(request)
            events.append(RowEvent(request, finish="error", error=message))
        return events

    def _abort_all(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            for r in waiting:
                self._forget(r)
        requests = [g.request for g in self._groups.values()]
        self._groups.clear()
        self.runner.clear()
        for request in requests:
            with self._cv:
                self._forget(request)
        self.output.put([RowEvent(r, finish="abort") for r in waiting + requests])
