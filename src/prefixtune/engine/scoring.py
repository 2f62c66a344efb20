"""PrefixLM.score: each text's tokens and their log-probabilities under an adapter, on the serving engine.

The same numbers the server's `echo` returns (engine/logprobs.py): every row is a request that prefills its
text and samples nothing (max_new_tokens 0), so rows of different adapters share the engine's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefixtune.engine.offline import run_requests
from prefixtune.engine.rows import build_requests
from prefixtune.engine.sampling import SamplingParams


@dataclass
class Score:
    """One text's log-probabilities."""

    tokens: list[int]  # the text's token ids
    logprobs: list[float | None]  # log P(token i | tokens before it, the adapter's prefix); None for the first
    top: list[list[tuple[int, float]] | None]  # per token, the top_logprobs likeliest (token, logprob), best first
    adapter: str | None  # adapter used (None = the base model)

    @property
    def total(self) -> float:
        """Sum of the log-probabilities (the first token has none)."""
        return sum(lp for lp in self.logprobs if lp is not None)


def with_adapters(texts: Sequence[str] | str, adapters: Sequence[str | None] | str | None, noun: str = "prompt"
                  ) -> tuple[list[str], list[str | None]]:
    """The texts as a list and one adapter per text (a single name, or None = the base model, applies to all)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    adapters = [adapters] * len(texts) if isinstance(adapters, str) or adapters is None else list(adapters)
    if len(adapters) != len(texts):
        raise ValueError(f"{len(texts)} {noun}s but {len(adapters)} adapters; give one adapter per {noun}")
    return texts, adapters


def score_texts(lm, texts: Sequence[str], adapters: Sequence[str | None] | str | None = None, top_logprobs: int = 0,
                guidance_scale: float | None = None, guidance_negative: str | None = None,
                add_special_tokens: bool = True) -> list[Score]:
    texts, adapters = with_adapters(texts, adapters, "text")
    if not isinstance(top_logprobs, int) or top_logprobs < 0:
        raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
    if not texts:
        return []
    base = SamplingParams(max_new_tokens=0, prompt_logprobs=top_logprobs)
    requests = build_requests(lm, texts, adapters, [None] * len(texts), base, (guidance_scale, guidance_negative),
                              None, add_special_tokens=add_special_tokens)
    scores = []
    for finished, request in zip(run_requests(lm, requests), requests):
        entries = finished.prompt_logprobs or [None] * len(request.prompt_ids)
        scores.append(Score(list(request.prompt_ids), [None if e is None else e[0] for e in entries],
                            [None if e is None else e[1] for e in entries], request.adapter))
    return scores
