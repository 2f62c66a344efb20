"""PrefixLM.generate's rows and results: a prompt's samples and seeds in, one Generation per result out.

Kept apart from engine/lm.py (as engine/scoring.py is for PrefixLM.score) so the model facade stays about
loading and resolving adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from prefixtune.engine.offline import Finished
from prefixtune.engine.requests import Request

T = TypeVar("T")


@dataclass
class Generation:
    """One prompt's result."""

    text: str  # generated text (stop string cut off, special tokens skipped)
    tokens: list[int]  # generated token ids (EOS not included)
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)
    prompt_tokens: int  # tokens in the prompt
    adapter: str | None  # adapter used (None = base model)
    score: float | None = None  # beam search: summed log-prob / generated_len ** length_penalty; composed
    # (product of experts): its evidence, sum over tokens and parts of log p_part - log p_neg (engine/compose.py)
    logprobs: list | None = None  # generate(logprobs=N): per token (logprob, top N [(id, logprob)]), + EOS if it ended

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def sample_rows(prompts: list[str], adapters: list, seed: int | Sequence[int | None] | None, num_samples: int,
                best_of: int | None = None) -> tuple[list[str], list, list[int | None]]:
    """Rows and their seeds: `num_samples` rows per prompt, prompt by prompt, sample i seeded with seed + i;
    with `best_of` > num_samples, best_of rows per prompt, the extra candidate j seeded from (seed, j) apart
    (seed + j would be the next prompt's stream when callers seed prompts 1 apart, as eval does).

    `seed` is one for all prompts or one per prompt (None = unseeded)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if best_of is not None and (not isinstance(best_of, int) or best_of < num_samples):
        raise ValueError(f"best_of must be an integer >= num_samples ({num_samples}), got {best_of!r}")
    per = max(num_samples, best_of or 1)
    if per == 1:
        return prompts, adapters, seeds
    return ([p for p in prompts for _ in range(per)], [a for a in adapters for _ in range(per)],
            [s for seed in seeds for s in candidate_seeds(seed, num_samples, per)])


def candidate_seeds(seed: int | None, n: int, per: int) -> list[int | None]:
    """The seeds of one prompt's `per` samples (n kept; the server's n / best_of too): seed + j for the first
    n, a stream derived from (seed, j) for each extra best_of candidate (None: all unseeded)."""
    return [None if seed is None else seed + j if j < n else candidate_seed(seed, j) for j in range(per)]


def candidate_seed(seed: int, j: int) -> int:
    """A best_of candidate's own stream, derived from (seed, j) by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed % 2**63, j]).generate_state(1, np.uint64)[0] % 2**63)


def keep_best(results: list[T], per: int, keep: int) -> list[T]:
    """Of each prompt's `per` candidates (consecutive, each with a `score`), the `keep` with the highest score,
    best first (the server's best_of ranks its choices with it too)."""
    out = []
    for start in range(0, len(results), per):
        chunk = results[start:start + per]
        out += sorted(chunk, key=lambda g: float("-inf") if g.score is None else g.score, reverse=True)[:keep]
    return out


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
