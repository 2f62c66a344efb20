"""Offline generation on the serving engine: the caller's thread steps a Scheduler until every request is done.

This is what vLLM's `LLM` class is to its EngineCore: the same scheduler, model runner, sampler and output
processor the server runs, so offline results, eval, compare and the server cannot drift apart. Every request is
admitted at once (the batch is the whole call) and its prompt runs whole (no step has running rows to protect
from a long prefill).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from prefixtune.engine.policy import rows_of
from prefixtune.engine.requests import Output, Request
from prefixtune.engine.scheduler import Scheduler


@dataclass
class Finished:
    """Everything one request produced, its choices by index."""

    text: str = ""  # choice 0's text (stop string cut off)
    tokens: list[int] = field(default_factory=list)  # choice 0's token ids (EOS not included)
    finish_reason: str | None = None
    error: str | None = None
    score: float | None = None  # beam search: the best hypothesis' score
    choices: dict[int, Output] = field(default_factory=dict)  # final Output per choice index (beams)
    logprobs: list = field(default_factory=list)  # per token, when asked for (engine/logprobs.py)
    prompt_logprobs: list | None = None  # per prompt token (first None), when asked for

    def add(self, out: Output) -> None:
        if out.index == 0:
            self.text += out.text
            self.tokens += out.token_ids
            self.logprobs += out.logprobs or []
            self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        if out.finish_reason is not None:
            self.choices[out.index] = out
            if out.index == 0:
                self.finish_reason, self.error, self.score = out.finish_reason, out.error, out.score


def run_requests(lm, requests: Sequence[Request], lora=None) -> list[Finished]:
    """Run `requests` to the end on a fresh engine in this thread; one Finished per request, in order.

    `lora`: a PeftModel injected into lm.model (its LoRA rows; a guided row's companion runs without it).
    A request whose step failed ends with finish_reason "error" and its message: raised here as RuntimeError.
    """
    if not requests:
        return []
    rows = sum(rows_of(r) for r in requests)
    engine = Scheduler(lm, max_batch=rows, max_queue=len(requests), start=False, lora=lora,
                       max_inflight_tokens=1 << 62)
    results = [Finished() for _ in requests]
    for request, result in zip(requests, results):
        request.emit = result.add
    engine.submit_many(requests)
    while engine.run_once():
        pass
    failed = [r.error for r in results if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"generation failed: {failed[0]}")
    return results
