"""Eval loss over tokenized rows: the one token-weighted loop that training, LoRA, eval and bench share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prefixtune.train.examples import Tokenized, collate


@dataclass
class EvalLoss:
    loss: float  # mean cross-entropy per scored token
    per_adapter: dict[str, float]  # the same, per row adapter name
    tokens: int  # scored tokens


@torch.inference_mode()  # cheaper than no_grad: no version counters or views tracked
def eval_loss(model, rows: Sequence[Tokenized], pad_id: int, batch_size: int, device,
              prefix_of: Callable[[str], torch.Tensor | None] | None = None, bar=None) -> EvalLoss:
    """Token-weighted loss of `model` (a PrefixModel) on `rows`.

    Rows use the model's own encoders by adapter name, or, with `prefix_of`, folded prefixes looked up by
    that name (stored adapters; None = no prefix).
    """
    sums: dict[str, list[float]] = {}
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id)
        how = ({"prefixes": [prefix_of(a) for a in batch.adapters]} if prefix_of is not None
               else {"adapters": batch.adapters})
        out = model(batch.input_ids.to(device), batch.attention_mask.to(device), labels=batch.labels.to(device),
                    **how)
        for name, loss_sum, tokens in zip(batch.adapters, out.row_loss_sum.tolist(), out.row_tokens.tolist()):
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] += loss_sum
            acc[1] += tokens
        if bar is not None:
            bar.update(len(batch.adapters))
    tokens = int(sum(n for _, n in sums.values()))
    loss = sum(s for s, _ in sums.values()) / max(tokens, 1)
    return EvalLoss(loss, {name: s / max(n, 1) for name, (s, n) in sums.items()}, tokens)
