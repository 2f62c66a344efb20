"""Presence, frequency and repetition penalties and logit bias: each row its own, applied to a batch at once.

The definitions are the ones clients expect. OpenAI's presence and frequency penalties subtract from a token's
logit `presence * [count > 0] + frequency * count`, counting the row's *generated* tokens. vLLM's (and
transformers') repetition penalty divides a positive logit by `repetition_penalty` and multiplies a negative one
by it, for every token seen in the prompt or the output. `logit_bias` adds a fixed value per token id (OpenAI:
-100 bans a token, 100 all but forces it). vLLM's order: repetition, then frequency and presence, then the
bias. Rows without any of them are never touched (their logits are not even copied), so a row's penalty changes
only that row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value
PENALTY_LIMIT = 2.0  # OpenAI's range for presence_penalty and frequency_penalty
# repetition_penalty's range: dividing by less overflows a float32 logit (1e-151 made NaN probabilities).
REPETITION_RANGE = (0.01, 100.0)


def validate_penalties(presence: float, frequency: float, repetition: float, bias: dict[int, float]) -> None:
    """A ValueError naming the setting out of range (the ranges OpenAI and vLLM accept)."""
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:  # also rejects NaN
            raise ValueError(f"{name} must be in [-2, 2], got {value}")
    if not REPETITION_RANGE[0] <= repetition <= REPETITION_RANGE[1]:
        raise ValueError(f"repetition_penalty must be in [0.01, 100] (1 = off), got {repetition}")
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if not -BIAS_LIMIT <= value <= BIAS_LIMIT:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")


def check_bias_ids(bias: dict[int, float], width: int) -> None:
    """Token ids the model has no logit for are the caller's mistake (checked before the request takes a row)."""
    bad = sorted(t for t in bias if t >= width)
    if bad:
        raise ValueError(f"logit_bias token id {bad[0]} is out of range: the model has {width} token ids")


@dataclass(eq=False)
class RowPenalty:
    """One request's penalty settings and the counts of the tokens it generated (on the logits' device)."""

    presence: float
    frequency: float
    repetition: float
    bias: dict[int, float]
    prompt_ids: list[int]
    counts: torch.Tensor | None = None  # (V,) float32: times each token was generated; built on first use
    seen: torch.Tensor | None = None  # (V,) bool: prompt or output token (repetition penalty only)
    bias_ids: torch.Tensor | None = field(default=None, repr=False)  # (K,) long
    bias_values: torch.Tensor | None = field(default=None, repr=False)  # (K,) float32

    def ready(self, width: int, device: torch.device) -> None:
        if self.counts is not None:
            return
        self.counts = torch.zeros(width, dtype=torch.float32, device=device)
        if self.repetition != 1.0:
            self.seen = torch.zeros(width, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in self.prompt_ids if t < width], dtype=torch.long, device=device)
            self.seen[ids] = True
        self.bias_ids = torch.tensor(list(self.bias), dtype=torch.long, device=device)
        self.bias_values = torch.tensor(list(self.bias.values()), dtype=torch.float32, device=device)

    def accept(self, token: int) -> None:
        if self.counts is not None and token < self.counts.shape[0]:
            self.counts[token] += 1
            if self.seen is not None:
                self.seen[token] = True


def new_penalty(params, prompt_ids: list[int]) -> RowPenalty | None:
    """The row's penalty state, or None when it uses none of them (the common case costs nothing)."""
    if not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
            or params.logit_bias):
        return None
    return RowPenalty(params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
                      dict(params.logit_bias), list(prompt_ids) if params.repetition_penalty != 1.0 else [])


def apply_penalties(logits: torch.Tensor, rows: list[int], penalties: list[RowPenalty]) -> torch.Tensor:
    """logits (B, V) with rows `rows` (slot indices) penalised, each by its own RowPenalty; other rows as given."""
    if not rows:
        return logits
    device, width = logits.device, logits.shape[-1]
    for p in penalties:
        p.ready(width, device)
    index = torch.tensor(rows, dtype=torch.long, device=device)
    x = logits.index_select(0, index).float()  # (R, V)
    counts = torch.stack([p.counts for p in penalties])  # (R, V)
    if any(p.repetition != 1.0 for p in penalties):
        seen = torch.stack([p.seen if p.seen is not None else torch.zeros_like(p.counts, dtype=torch.bool)
                            for p in penalties])  # (R, V)
        rep = torch.tensor([p.repetition for p in penalties], device=device).view(-1, 1)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    if any(p.frequency or p.presence for p in penalties):
        frequency = torch.tensor([p.frequency for p in penalties], device=device).view(-1, 1)
        presence = torch.tensor([p.presence for p in penalties], device=device).view(-1, 1)
        x = x - frequency * counts - presence * (counts > 0).float()
    if any(p.bias for p in penalties):
        which = torch.cat([torch.full_like(p.bias_ids, r) for r, p in enumerate(penalties)])  # (K,)
        x = x.index_put((which, torch.cat([p.bias_ids for p in penalties])),
                        torch.cat([p.bias_values for p in penalties]), accumulate=True)
    return logits.index_copy(0, index, x.to(logits.dtype))
