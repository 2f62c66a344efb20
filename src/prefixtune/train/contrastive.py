"""The discriminative loss of a per-label family (Qian et al. 2022, "Controllable Natural Language Generation
with Contrastive Prefixes"): each text should be explained better by its own label's prefix than by the
others', so the prefixes learn what tells the labels apart, not only what the texts share.

For a row x of label y, with candidate prefixes k (its own and some or all of the others),

    CE(softmax_k(-NLL(x | prefix_k)), y)

is p(y | x) of the Bayes classifier the family defines (uniform prior). Every candidate is one more copy of
the row in the same forward pass, so the cost is (1 + negatives) forwards per row.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefixtune.train.examples import Batch


@dataclass
class ContrastiveParts:
    lm_sum: torch.Tensor  # summed token losses of the rows under their own adapters (the LM loss's numerator)
    lm_tokens: int  # scored tokens of those rows
    contrast_sum: torch.Tensor  # summed cross-entropy of the contrasted rows
    contrasted: int  # rows that had negatives (family-adapter rows have none)


def negatives_for(adapter: str, family: Sequence[str], negatives: int, rng: random.Random) -> list[str]:
    others = [a for a in family if a != adapter]
    if negatives and negatives < len(others):
        return rng.sample(others, negatives)
    return others


def contrastive_forward(model, part: Batch, family: Sequence[str], negatives: int, rng: random.Random,
                        device: torch.device) -> ContrastiveParts:
    """One forward over the rows plus a copy of each row per negative adapter."""
    rows, adapters = list(range(len(part.adapters))), list(part.adapters)
    contrasted: list[int] = []  # rows with negatives, in order
    width = 0
    for b, adapter in enumerate(part.adapters):
        if adapter not in family:
            continue
        chosen = negatives_for(adapter, family, negatives, rng)
        width = width or len(chosen)
        contrasted.append(b)
        rows.extend([b] * len(chosen))
        adapters.extend(chosen)
    index = torch.tensor(rows, dtype=torch.long)
    out = model(part.input_ids[index].to(device), part.attention_mask[index].to(device), adapters=adapters,
                labels=part.labels[index].to(device))
    nll = out.row_nll  # (B + C*width,) summed token losses, differentiable
    n = len(part.adapters)
    lm_sum, lm_tokens = nll[:n].sum(), int(out.row_tokens[:n].sum())
    if not contrasted or not width:
        return ContrastiveParts(lm_sum, lm_tokens, nll.sum() * 0.0, 0)
    pos = nll[torch.tensor(contrasted, dtype=torch.long, device=nll.device)]  # (C,)
    neg = nll[n:].view(len(contrasted), width)  # (C, width)
    scores = -torch.cat([pos.unsqueeze(1), neg], dim=1)  # (C, 1 + width): log-likelihood per candidate
    target = torch.zeros(len(contrasted), dtype=torch.long, device=scores.device)
    return ContrastiveParts(lm_sum, lm_tokens, F.cross_entropy(scores, target, reduction="sum"), len(contrasted))
