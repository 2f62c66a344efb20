"""Guidance: sharpen an adapter's control by contrasting it with an unconditioned row.

A guided request decodes as a *group* of two rows of the same mixed batch with the same prompt: the
conditioned row (its adapter's prefix) and the unconditioned row (the base model, or a `negative` adapter
such as a family's unconditional prefix). Each step the group draws ONE token from

    logp = log_softmax(u) + scale * (log_softmax(c) - log_softmax(u))

(classifier-free guidance; scale 1 is the adapter alone, 0 the unconditioned row alone), both rows take it,
and the group finishes together. `scale == 1` is treated as "off": no second row is run at all.
"""

from __future__ import annotations

import math

import torch

OFF = 1.0  # guidance_scale that means "no guidance"


def validate_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = off), got {scale!r}")


def is_guided(scale: float | None) -> bool:
    return scale is not None and float(scale) != OFF


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Combined next-token log-probabilities (G, V) of G groups from their rows' logits (G, V) each.

    `scale` is a float or a (G,) tensor (groups of one batch may use different scales). The result is a
    log-probability vector up to a constant, usable as logits by any sampler (temperature, top-p, top-k).
    """
    lc = torch.log_softmax(cond.float(), dim=-1)  # (G, V)
    lu = torch.log_softmax(uncond.float(), dim=-1)  # (G, V)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(lc.dtype).view(-1, 1)  # (G, 1)
    # Where the conditioned row gives a token -inf (masked), keep it impossible whatever the scale.
    out = lu + scale * (lc - lu)
    out = torch.where(torch.isfinite(lu), out, lc)  # a token the unconditioned row masks: the adapter decides
    return torch.where(torch.isfinite(lc), out, torch.full_like(out, float("-inf")))


__all__ = ["OFF", "guided_logits", "is_guided", "validate_scale"]
