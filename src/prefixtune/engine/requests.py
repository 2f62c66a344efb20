"""What flows between the engine's stages and its callers: requests in, outputs out, and the shared counters.

Plain dataclasses with no behaviour beyond validation, so every stage (policy, runner, output processor,
scheduler) can import them without importing each other.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixtune.engine.compose import Experts
from prefixtune.engine.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled", "abort", "error")


class QueueFull(RuntimeError):
    """More waiting requests (or in-flight tokens) than the limits; the caller should retry later (HTTP 429)."""


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


class RetryableError(str):
    """A request's error text when what failed was the process serving it, not the request: a retry will pass.

    The server answers it 503 + Retry-After with `code` (server/jobs.check_errors), not 500."""

    retry_after = 5
    code = "engine_restarting"


@dataclass
class Output:
    """What one step produced for one request (emitted on the output thread)."""

    request_id: str  # Request.request_id
    text: str  # new text since the previous output (text that may start a stop string is held back)
    token_ids: list[int]  # new token ids (EOS is never included)
    finish_reason: str | None  # None while running; stop | length | cancelled | abort | error
    completion_tokens: int  # tokens generated so far
    error: str | None = None  # message when finish_reason == "error"
    index: int = 0  # which of the request's choices (a beam request returns num_return_sequences)
    score: float | None = None  # beam search: summed log-prob / generated_len ** length_penalty; a composed
    # product of experts: its evidence (engine/compose.py), on the final Output
    logprobs: list | None = None  # per token of token_ids: (logprob, top [(id, logprob)]) (engine/logprobs.py)
    prompt_logprobs: list | None = None  # per prompt token (first None), on the request's first Output only
    stop_token: int | None = None  # the EOS that ended it when logprobs are asked for: its entry ends `logprobs`


def _ignore(_: Output) -> None:
    return None


@dataclass(eq=False)
class Request:
    """One generation request: a tokenized prompt, its adapter and how to sample (one or more batch rows).

    eq=False: a request is a record with an identity (`request in queue` must never compare prefix tensors)."""

    prompt_ids: list[int]  # tokenized prompt (no padding)
    adapter: str | None  # adapter name (None = base model); labels stats and resolves `prefix` if unset
    params: SamplingParams  # per-request sampling, stop strings, max new tokens, guidance_scale
    emit: Callable[[Output], None] = _ignore  # receives every Output, on the output thread; must not block
    prefix: torch.Tensor | None = None  # folded kv (2L, kv_heads, P, head_dim); None: lm.adapter(adapter).kv
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # handle for cancel()
    cancelled: bool = False  # set by the engine's worker when Scheduler.cancel asked; rows leave before the next step
    negative: str | None = None  # guided: the unconditioned row's adapter (None = the base model)
    negative_prefix: torch.Tensor | None = None  # its folded kv; None: lm.adapter(negative).kv
    grammar: object = None  # its structured output compiled (engine/structured.py), set when submitted
    experts: Experts | None = None  # a composed adapter's product of experts (engine/compose.py): its rows
    stopped: bool = False  # a stop string ended it (the engine's worker sets it on the output processor's word)
    done: bool = False  # the output processor sent the final Output (written by that thread only)


@dataclass
class SchedulerStats:
    """Counters the metrics endpoint and the benchmark read (each has one writing thread)."""

    steps: int = 0  # decode steps (one forward of the running batch)
    step_rows: int = 0  # sum of batch rows over steps (mean batch size = step_rows / steps)
    last_batch_size: int = 0  # rows in the latest decode step
    max_batch_size: int = 0  # most rows ever decoded together
    max_adapters_in_batch: int = 0  # most distinct adapters (None counted) ever sharing one step
    mixed_steps: int = 0  # decode steps whose rows used more than one adapter (None counted)
    prefills: int = 0  # prefill forwards (each runs a chunk of one or more joining requests' prompts)
    prompt_tokens: int = 0  # prompt tokens run through the model (per prefilled row; rows sharing a prefill once)
    generated_tokens: int = 0  # tokens sampled (EOS excluded)
    # Finished requests by finish_reason (written by the output processor only); every key exists from the
    # start, so a reader on another thread never iterates while a key is inserted.
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
