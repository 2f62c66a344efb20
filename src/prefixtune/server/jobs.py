"""Bridge between the engine's threads and the event loop: one Job per HTTP request.

The engine's output thread calls Request.emit; emit appends the Output to the job's deque and marks the job in
the loop's Wakeups, which calls call_soon_threadsafe only if no wake-up is pending. So the engine never blocks
on a slow client, the loop never blocks on the model, and one engine step of many rows and many requests costs
one loop wake-up (and one socket write per stream), not one per row and token. When the loop falls behind the
engine, a stream sends everything that accumulated in one write (merged per choice): the slower the loop, the
less it has to do per token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Output, QueueFull, Request, Scheduler, SchedulerClosed
from prefixtune.server.protocol import APIError

# Engine finish reasons as the API reports them (vLLM's "abort" for rows the server gave up on).
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "abort": "abort"}


@dataclass
class Choice:
    """One row's accumulated result."""

    text: list[str] = field(default_factory=list)  # text pieces in order
    finish_reason: str | None = None  # API finish reason once done
    tokens: int = 0  # completion tokens
    error: str | None = None  # engine error message
    token_ids: list[int] = field(default_factory=list)  # generated tokens (for logprobs)
    logprobs: list = field(default_factory=list)  # per token, when asked for (engine/logprobs.py)
    prompt_logprobs: list | None = None  # per prompt token, when asked for (echo)
    stop_token: int | None = None  # the EOS that ended it, when logprobs are asked for
    score: float | None = None  # a composed request's evidence (engine/compose.py), what best_of ranks by


class Wakeups:
    """One event loop's pending wake-ups: many jobs marked during one engine step share one loop callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._marked: list[Job] = []

    def mark(self, job: Job) -> None:  # output thread
        with self._lock:
            first = not self._marked
            self._marked.append(job)
        if first:
            try:
                self.loop.call_soon_threadsafe(self._run)
            except RuntimeError:
                pass  # the event loop is closed: nobody listens any more

    def _run(self) -> None:  # event loop
        with self._lock:
            marked, self._marked = self._marked, []
        for job in marked:
            job._ready.set()


_WAKEUPS: dict[asyncio.AbstractEventLoop, Wakeups] = {}


def wakeups_for(loop: asyncio.AbstractEventLoop) -> Wakeups:
    wakeups = _WAKEUPS.get(loop)
    if wakeups is None:
        for old in [other for other in _WAKEUPS if other.is_closed()]:
            del _WAKEUPS[old]
        wakeups = _WAKEUPS[loop] = Wakeups(loop)
    return wakeups


class Job:
    """The rows (prompts x n) of one HTTP request; collect() or stream events() exactly once."""

    def __init__(self, scheduler: Scheduler, ttft=None):
        self.scheduler = scheduler
        self.wakeups = wakeups_for(asyncio.get_running_loop())
        self._pending: deque[tuple[int, Output]] = deque()  # appended by the output thread, drained by the loop
        self._ready = asyncio.Event()
        self.requests: list[Request] = []
        self.owners: list[Request] = []  # the request behind each choice (a beam request returns several)
        self.open: set[int] = set()  # choices not finished yet
        self.ttft = ttft  # histogram child to observe time to first token on, or None
        self.start = time.monotonic()
        self.first_token_at: float | None = None

    def add(self, prompt_ids: list[int], adapter: str | None, prefix, params: SamplingParams,
            negative: str | None = None, negative_prefix=None, experts=None) -> int:
        first = len(self.owners)
        request = Request(prompt_ids, adapter, params, partial(self._emit, first), prefix, negative=negative,
                          negative_prefix=negative_prefix, experts=experts)
        self.requests.append(request)
        self.owners += [request] * params.num_return_sequences
        return first

    async def submit(self) -> None:
        """All rows or none; QueueFull -> 429, shutting down -> 503, bad length -> 400."""
        try:
            # A remote engine (server/ray_ingress.py) learns whether a replica took the rows by awaiting it.
            remote = getattr(self.scheduler, "submit_remote", None)
            if remote is not None:
                await remote(self.requests)
            else:
                self.scheduler.submit_many(self.requests)
        except QueueFull as err:
            raise APIError(429, f"server busy: {err}; retry later", "rate_limit_error", None, "queue_full") from err
        except SchedulerClosed as err:
            retry = getattr(err, "retry_after", None)  # an engine process restarting (engine/supervisor.py)
            code = getattr(err, "code", None) or ("engine_restarting" if retry else "shutting_down")
            raise APIError(503, str(err), "server_error", None, code, retry_after=retry) from err
        except ValueError as err:
            param = "guidance_scale" if "guided" in str(err) else "max_tokens"
            raise APIError(400, str(err), param=param) from err
        self.open = set(range(len(self.owners)))

    @property
    def size(self) -> int:
        """Choices of this job."""
        return len(self.owners)

    def _emit(self, first: int, output: Output) -> None:  # output thread
        self._pending.append((first + output.index, output))
        self.wakeups.mark(self)

    def cancel(self) -> None:
        """Free the batch slots of rows still running (idempotent)."""
        for request_id in {self.owners[index].request_id for index in list(self.open)}:
            self.scheduler.cancel(request_id)

    async def batches(self) -> AsyncIterator[list[tuple[int, Output]]]:
        """Every output so far, as lists of (row index, Output) in order, until every row finished."""
        while self.open:
            if not self._pending:
                self._ready.clear()
                if not self._pending:
                    await self._ready.wait()
            batch = []
            while self._pending:
                index, output = self._pending.popleft()
                if output.finish_reason is not None:
                    self.open.discard(index)
                if self.first_token_at is None and output.token_ids:
                    self.first_token_at = time.monotonic()
                    if self.ttft is not None:
                        self.ttft.observe(self.first_token_at - self.start)
                batch.append((index, output))
            yield batch

    async def merged(self) -> AsyncIterator[list[tuple[int, Output]]]:
        """As batches(), with each choice's consecutive outputs merged into one (text joined, last counts)."""
        async for batch in self.batches():
            out: list[tuple[int, Output]] = []
            last: dict[int, int] = {}  # choice -> position in out of its open (unfinished) merged output
            for index, o in batch:
                at = last.get(index)
                if at is not None and not o.error:
                    prev = out[at][1]
                    o = Output(o.request_id, prev.text + o.text, prev.token_ids + o.token_ids, o.finish_reason,
                               o.completion_tokens, o.error, o.index,
                               logprobs=(prev.logprobs or []) + (o.logprobs or []) if o.logprobs else prev.logprobs,
                               prompt_logprobs=prev.prompt_logprobs or o.prompt_logprobs, stop_token=o.stop_token)
                    out[at] = (index, o)
                else:
                    out.append((index, o))
                    at = len(out) - 1
                last[index] = at
            yield out

    async def events(self) -> AsyncIterator[tuple[int, Output]]:
        async for batch in self.batches():
            for item in batch:
                yield item

    async def collect(self, http: HTTPRequest) -> list[Choice]:
        """Wait for every row; a client that disconnects meanwhile cancels them."""
        choices = [Choice() for _ in self.owners]
        watcher = asyncio.create_task(self._cancel_on_disconnect(http))
        try:
            async for index, out in self.events():
                choice = choices[index]
                choice.text.append(out.text)
                choice.tokens = out.completion_tokens
                choice.token_ids += out.token_ids
                choice.logprobs += out.logprobs or []
                choice.prompt_logprobs = out.prompt_logprobs or choice.prompt_logprobs
                choice.stop_token = out.stop_token
                if out.finish_reason is not None:
                    choice.finish_reason = FINISH.get(out.finish_reason, out.finish_reason)
                    choice.error, choice.score = out.error, out.score
        finally:
            watcher.cancel()
            self.cancel()
        return choices

    async def _cancel_on_disconnect(self, http: HTTPRequest) -> None:
        # The body is already read, so the next ASGI message is the disconnect (or nothing until we answer).
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.cancel()


def check_errors(choices: list[Choice]) -> None:
    failed = next((c for c in choices if c.error), None)
    if failed is not None:
        # engine.requests.RetryableError: the engine process or Ray replica died, not the request
        retry = getattr(failed.error, "retry_after", None)
        if retry is not None:
            raise APIError(503, str(failed.error), "server_error", None, failed.error.code, retry_after=retry)
        raise APIError(500, f"generation failed: {failed.error}", "server_error", None, "generation_failed")
    if all(c.finish_reason == "abort" and c.tokens == 0 for c in choices):
        raise APIError(503, "the request was aborted (server shutting down)", "server_error", None, "aborted")


class EventStream(StreamingResponse):
    """text/event-stream response that cancels its job however the stream ends (done, client gone, shutdown)."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
