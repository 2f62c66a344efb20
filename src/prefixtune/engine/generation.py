"""PrefixLM.generate's rows and results: a prompt's samples and seeds in, one Generation per result out.

Kept apart from engine/lm.py (as engine/scoring.py is for PrefixLM.score) so the model facade stays about
loading and resolving adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefixtune.engine.offline import Finished
from prefixtune.engine.requests import Request


@dataclass
class Generation:
    """One prompt's result."""

    text: str  # generated text (stop string cut off, special tokens skipped)
    tokens: list[int]  # generated token ids (EOS not included)
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)
    prompt_tokens: int  # tokens in the prompt
    adapter: str | None  # adapter used (None = base model)
    score: float | None = None  # beam search: summed log-prob / generated_len ** length_penalty
    logprobs: list | None = None  # generate(logprobs=N): per token (logprob, top N [(id, logprob)]), + EOS if it ended

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def sample_rows(prompts: list[str], adapters: list, seed: int | Sequence[int | None] | None, num_samples: int
                ) -> tuple[list[str], list, list[int | None]]:
    """Rows and their seeds: `num_samples` rows per prompt, prompt by prompt, sample i seeded with seed + i.

    `seed` is one for all prompts or one per prompt (None = unseeded)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if num_samples == 1:
        return prompts, adapters, seeds
    return ([p for p in prompts for _ in range(num_samples)], [a for a in adapters for _ in range(num_samples)],
            [None if s is None else s + i for s in seeds for i in range(num_samples)])


def to_generations(finished: Sequence[Finished], requests: Sequence[Request], num_return_sequences: int,
                   logprobs: int | None) -> list[Generation]:
    """One Generation per request, or a beam search's `num_return_sequences` best per request, best first."""
    results = []
    for f, r in zip(finished, requests):
        n, a = len(r.prompt_ids), r.adapter
        if num_return_sequences == 1:
            results.append(Generation(f.text, f.tokens, f.finish_reason or "length", n, a, f.score,
                                      f.logprobs if logprobs is not None else None))
            continue
        for i in range(num_return_sequences):
            c = f.choices[i]
            results.append(Generation(c.text, c.token_ids, c.finish_reason, n, a, c.score))
    return results
