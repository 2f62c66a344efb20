"""Guidance: sharpen an adapter's control by contrasting it with an unconditioned row.

A guided request decodes as a *group* of two rows of the same mixed batch with the same prompt: the
conditioned row (its adapter's prefix) and the unconditioned row (the base model, or a `negative` adapter
such as a family's unconditional prefix). Each step the group draws ONE token from

    logp = log_softmax(u) + scale * (log_softmax(c) - log_softmax(u))

(classifier-free guidance; scale 1 is the adapter alone, 0 the unconditioned row alone), both rows take it,
and the group finishes together. `scale == 1` is treated as "off": no second row is run at all. Two guards
make large scales usable (see guided_logits): layout tokens (EOS, punctuation, whitespace) keep the adapter's
own probabilities, and only tokens above a plausibility floor of the adapter's own distribution can be chosen.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch

OFF = 1.0  # guidance_scale that means "no guidance"
# Adaptive plausibility (Li et al. 2023, contrastive decoding): only tokens the adapter itself gives at least
# this share of its top token's probability stay candidates. Without it a large scale promotes tokens both
# rows find unlikely but the negative finds even less likely (half words). Measured on the emotion family at
# x3 against its family adapter (README "Control quality"): 0.05 gave distinct-2 0.70, 0.03 gave 0.74 but
# accuracy 0.78; 0.04 keeps both (0.74, 0.84). With layout tokens left to the adapter, a low floor no longer
# lets ",,,," runs through.
PLAUSIBILITY = 0.04


def validate_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = off), got {scale!r}")


def is_guided(scale: float | None) -> bool:
    return scale is not None and float(scale) != OFF


def guided_temperature(scale: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(G,) the temperature guided groups sample at when their requests ask for `temperature` (G,): min(1, scale*T)
    below 1, T itself from 1 up (greedy and beam groups: pass 1).

    Guidance already concentrates a row on its adapter's label words and the phrasing around them; a temperature
    below 1 on top compounded the two. Measured on the emotion family (x1.5 against emotion-all, 96 samples a
    cell): distinct-2 0.75 at T 1 fell to 0.62 at T 0.7 and 0.54 at T 0.7 / top-p 0.9, while accuracy was already
    0.97 there (docs/BENCHMARKS.md, "Sampling temperature and top-p"). So the scale counts toward the
    temperature: a guided row sharpens further only below T = 1 / scale."""
    boost = torch.clamp(scale, min=1.0)  # a scale below 1 (toward the negative) sharpens nothing
    return torch.where(temperature < 1, torch.clamp(boost * temperature, max=1.0), temperature)


def adapter_nucleus(cond: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(G, V) bool: per group, the smallest set of tokens whose probability under the adapter's own logits `cond`
    (G, V) at `temperature` (G,) reaches `top_p` (G,), the top token always: a guided row's nucleus.

    As the plausibility floor, top-p picks a guided row's candidates on the adapter's distribution and guidance
    reweighs within them: cut again on the guided distribution (sharper than the adapter's), x1.5 at top-p 0.9
    lost distinct-2 0.75 -> 0.66 at T 1 (docs/BENCHMARKS.md, "Sampling temperature and top-p")."""
    probs = torch.softmax(cond.float() / temperature.view(-1, 1), dim=-1)  # (G, V)
    ranked, order = probs.sort(dim=-1, descending=True)  # (G, V)
    drop = ranked.cumsum(-1) - ranked >= top_p.view(-1, 1)
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, ~drop)


def layout_mask(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """(V,) bool: the tokens whose text is only punctuation, symbols, whitespace or control characters.

    These carry layout, not content, so guidance leaves their probabilities to the adapter (guided_logits).
    Byte pieces of a multi-byte character decode to U+FFFD (a symbol) and count as layout too.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    flags = [all(unicodedata.category(ch)[0] in "PSZC" for ch in text.strip()) for text in texts]
    size = max(vocab_size or 0, len(flags))
    return torch.tensor(flags + [False] * (size - len(flags)), dtype=torch.bool)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor,
                  plausibility: float | None = None, eos_ids: Sequence[int] = (),
                  layout: torch.Tensor | None = None) -> torch.Tensor:
    """Combined next-token log-probabilities (G, V) of G groups from their rows' logits (G, V) each.

    `scale` is a float or a (G,) tensor (groups of one batch may use different scales). `layout` is a (V,)
    bool mask (see layout_mask) of tokens that, like EOS, keep the adapter's own probability. The result is
    a log-probability vector up to a constant, usable as logits by any sampler (temperature, top-p, top-k).
    """
    lc = torch.log_softmax(cond.float(), dim=-1)  # (G, V)
    lu = torch.log_softmax(uncond.float(), dim=-1)  # (G, V)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(lc.dtype).view(-1, 1)  # (G, 1)
    out = lu + scale * (lc - lu)
    return _guarded(out, lc, lu, plausibility, eos_ids, layout)


def product_logits(conds: torch.Tensor, uncond: torch.Tensor, scales: torch.Tensor,
                   plausibility: float | None = None, eos_ids: Sequence[int] = (),
                   layout: torch.Tensor | None = None, decay: torch.Tensor | None = None) -> torch.Tensor:
    """Product of experts (V,) of k parts: conds (k, V) the parts' logits, uncond (k, V) each part's negative.

        logp = log mean_i p_part_i + decay * sum_i scales_i * (log p_part_i - log p_neg(i))

    The anchor is the parts' mixture (the mean of their probabilities), and each part adds its own guidance
    push on top. `decay` (V,), optional, weighs each token's push (engine/compose.py lowers it for tokens the
    row already drew). The guards act as for one adapter whose distribution is that mixture: layout tokens keep
    its probabilities and a token any part finds plausible can be chosen, so one part's words (an emotion's)
    are not cut because another part (a news topic) finds them rare (measured: docs/BENCHMARKS.md
    "Composition").
    """
    lc = torch.log_softmax(conds.float(), dim=-1)  # (k, V)
    lu = torch.log_softmax(uncond.float(), dim=-1)  # (k, V)
    return product_logprobs(lc, lu, scales, plausibility, eos_ids, layout, decay)


def product_logprobs(lc: torch.Tensor, lu: torch.Tensor, scales: torch.Tensor, plausibility: float | None = None,
                     eos_ids: Sequence[int] = (), layout: torch.Tensor | None = None,
                     decay: torch.Tensor | None = None) -> torch.Tensor:
    """product_logits from the parts' and negatives' log-probabilities (k, V) each, already normalised."""
    push = (scales.to(lc.dtype).view(-1, 1) * (lc - lu)).sum(0, keepdim=True)  # (1, V)
    if decay is not None:
        push = push * decay.to(lc.dtype)
    mixture = torch.logsumexp(lc, dim=0, keepdim=True) - math.log(len(lc))  # (1, V)
    # A token some negative masks gets no push: the mixture decides (-inf in any negative makes the sum -inf).
    return _guarded(mixture + push, mixture, lu.sum(0, keepdim=True), plausibility, eos_ids, layout)[0]


def _guarded(out: torch.Tensor, lc: torch.Tensor, lu: torch.Tensor, plausibility: float | None,
             eos_ids: Sequence[int], layout: torch.Tensor | None) -> torch.Tensor:
    """The guards of a guided distribution `out` (G, V), from the adapter's (lc) and the negative's (lu)
    log-probabilities."""
    out = torch.where(torch.isfinite(lu), out, lc)  # a token the unconditioned row masks: the adapter decides
    fixed = torch.zeros(lc.shape[-1], dtype=torch.bool, device=lc.device) if layout is None else \
        layout[: lc.shape[-1]].to(lc.device)  # (V,)
    if eos_ids:
        fixed = fixed.index_fill(0, torch.tensor(sorted(eos_ids), dtype=torch.long, device=lc.device), True)
    content = lc.masked_fill(fixed, float("-inf"))  # (G, V): the tokens guidance may reweigh
    alpha = PLAUSIBILITY if plausibility is None else plausibility
    # Relative to the adapter's likeliest token, EOS included: where it would rather stop, the leftovers of
    # its distribution (rare junk, which the base model finds even rarer) must not be promoted. The
    # likeliest content token always survives, so a row that does not stop can go on.
    floor = lc.max(dim=-1, keepdim=True).values + math.log(alpha) if alpha > 0 else float("-inf")  # (G, 1)
    best = content.argmax(dim=-1, keepdim=True)  # (G, 1)
    # A token the adapter masks (-inf) stays impossible whatever the scale.
    keep = torch.isfinite(content) & ((content >= floor) | torch.zeros_like(content, dtype=torch.bool).scatter(
        -1, best, True))
    out = torch.where(keep, out, torch.full_like(out, float("-inf")))
    if not bool(fixed.any()):
        return out
    # When to stop, and the layout around words, stay the adapter's decisions: guidance only redistributes
    # the mass of the content tokens. Guided EOS would be amplified too (the data's texts end sooner than
    # the base model's) and samples collapsed to "i feel angry"; guided punctuation promoted a 16-comma
    # token wherever the adapter was near its end, since it lifts that token with EOS and the base never does.
    p_fixed = lc.masked_fill(~fixed, float("-inf")).exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)  # (G, 1)
    out = torch.log_softmax(out, dim=-1) + torch.log1p(-p_fixed)
    return torch.where(fixed, lc, out)


__all__ = ["OFF", "adapter_nucleus", "guided_logits", "guided_temperature", "is_guided", "layout_mask",
           "product_logits", "product_logprobs", "validate_scale"]
