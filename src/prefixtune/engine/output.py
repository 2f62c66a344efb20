"""Output processor: token ids in, text out. Runs on its own thread so the decode loop never detokenizes.

The engine hands over RowEvents (a sampled token and/or the engine's finish reason); here each request gets
its incremental detokenizer and stop-string matcher (engine/text.py), and its Outputs go to Request.emit.
A stop string is found here, a step or two after the token that completed it was sampled: the processor
finishes the request at once (its text and token count end at the stop) and asks the engine to drop the
row (`on_stop(request_id)`; `on_stop(request_id, True)` cancels the row of a consumer that raised); tokens the
engine sampled meanwhile are discarded, as vLLM v1 does.

This is also the only writer of SchedulerStats.finished (finishes of queued requests cancelled from the event
loop come through here too), so the counters have one owning thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prefixtune.engine.beam import Hypothesis
from prefixtune.engine.requests import Output, Request
from prefixtune.engine.text import TextTracker


@dataclass
class RowEvent:
    """One step of one request, from the engine."""

    request: Request
    token: int | None = None  # the token sampled this step (None: only a finish)
    finish: str | None = None  # engine finish: stop (EOS) | length | cancelled | abort | error
    error: str | None = None
    beams: list[Hypothesis] | None = None  # a beam request's best hypotheses (its only event, when it ends)
    logprob: tuple | None = None  # the token's entry when the request asked for logprobs (engine/logprobs.py)
    prompt_logprobs: list | None = None  # the prompt's entries (echo, scoring), with the request's first event
    stop_token: int | None = None  # the EOS that ended it, when its log-prob is reported (`logprob`)
    score: float | None = None  # a composed request's evidence so far (engine/compose.note_tokens)


@dataclass
class _State:
    text: TextTracker
    generated: int = 0
    score: float | None = None  # the latest event's score: what the request's last Output reports


class OutputProcessor:
    def __init__(self, tokenizer, stats, on_stop: Callable[..., None]):
        self.tokenizer = tokenizer  # its own copy: a fast tokenizer must not be shared between threads
        self.stats = stats
        self.on_stop = on_stop
        self._states: dict[str, _State] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # ---- plumbing --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prefixtune-output", daemon=True)
            self._thread.start()

    def put(self, events: list[RowEvent]) -> None:
        """From the engine (or a cancel): queued for the output thread, or processed now when none runs."""
        if not events:
            return
        if self._thread is not None:
            self._queue.put(events)
        else:
            self.process(events)

    def close(self, timeout: float = 10.0) -> None:
        """Process everything already handed over, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            events = self._queue.get()
            if events is None:
                return
            self.process(events)

    # ---- text ------------------------------------------------------------------------------------------
    def process(self, events: list[RowEvent]) -> None:
        for event in events:
            try:
                self._one(event)
            except Exception as exc:  # noqa: BLE001 - a bad row must not stop the others' outputs
                self._finish(event.request, self._states.get(event.request.request_id), "error",
                             error=f"{type(exc).__name__}: {exc}")

    def _one(self, event: RowEvent) -> None:
        request = event.request
        if request.done:
            return  # finished here already (a stop string); the engine's later events are moot
        if event.beams is not None:
            self._beams(request, event.beams)
            return
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = _State(TextTracker(self.tokenizer, request.params.stop))
        if event.score is not None:
            state.score = event.score
        if event.token is None:
            # EOS and aborts send what was held back; a cancelled client is gone, an error has no text.
            text = state.text.flush() if event.finish in ("stop", "abort") else ""
            self._finish(request, state, event.finish or "error", text, error=event.error,
                         prompt_logprobs=event.prompt_logprobs, stop_token=event.stop_token,
                         logprobs=None if event.stop_token is None else [event.logprob])
            return
        state.generated += 1
        text, stopped = state.text.push(event.token)
        extra = dict(logprobs=None if event.logprob is None else [event.logprob],
                     prompt_logprobs=event.prompt_logprobs)
        if stopped:
            self._finish(request, state, "stop", text, [event.token], **extra)
            self.on_stop(request.request_id)
        elif event.finish is None:
            self._emit(request, Output(request.request_id, text, [event.token], None, state.generated, **extra))
        else:
            if event.finish == "length":
                text += state.text.flush()
            self._finish(request, state, event.finish, text, [event.token], event.error, **extra)

    def _beams(self, request: Request, hypotheses: list[Hypothesis]) -> None:
        """Every choice of a beam request at once, each cut at a stop string as its stream would have been."""
        want = request.params.num_return_sequences
        # Every candidate banned (n-gram rule) leaves nothing to return: empty choices, as offline search gives.
        hypotheses = hypotheses + [Hypothesis([], float("-inf"), "length")] * (want - len(hypotheses))
        outputs = []
        for index, hyp in enumerate(hypotheses[:want]):
            tracker, pieces, reason, used = TextTracker(self.tokenizer, request.params.stop), [], hyp.finish_reason, 0
            for token in hyp.tokens:
                used += 1
                piece, stopped = tracker.push(token)
                pieces.append(piece)
                if stopped:
                    reason = "stop"
                    break
            else:
                pieces.append(tracker.flush())
            outputs.append(Output(request.request_id, "".join(pieces), hyp.tokens[:used], reason, used, index=index,
                                  score=hyp.score))
        request.done = True
        self.stats.finished[outputs[0].finish_reason] += 1  # one request, however many choices
        for output in outputs:
            self._emit(request, output)

    def _finish(self, request, state: _State | None, reason: str, text: str = "", token_ids=None,
                error: str | None = None, **logprobs) -> None:
        request.done = True
        self._states.pop(request.request_id, None)
        self.stats.finished[reason] += 1
        generated, score = (state.generated, state.score) if state is not None else (0, None)
        self._emit(request, Output(request.request_id, text, token_ids or [], reason, generated, error,
                                   score=score, **logprobs))
        for index in range(1, request.params.num_return_sequences):  # a beam request ended early: every choice
            self._emit(request, Output(request.request_id, "", [], reason, 0, error, index=index))

    def _emit(self, request, output) -> None:
        try:
            request.emit(output)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the other rows: its row ends
            if output.finish_reason is None:
                self.on_stop(request.request_id, True)
