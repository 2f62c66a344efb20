"""One prefix per row: caches, attention masks and positions for mixed-adapter batches.

Every code path that runs the base model with a prefix (training, offline generation, serving) goes
through here, so a change in how transformers passes the cache breaks one place, and the drift tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


@dataclass
class PrefixBatch:
    """Per-row prefixes, left-padded to the longest one."""

    kv: torch.Tensor | None  # (2L, B, kv_heads, Pmax, head_dim); None when no row has a prefix
    mask: torch.Tensor  # (B, Pmax) 1 = a real virtual token of this row
    lengths: torch.Tensor  # (B,) virtual tokens per row (0 = base model)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])


def stack_prefixes(
    prefixes: Sequence[torch.Tensor | None],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PrefixBatch:
    """Left-pad each row's prefix (2L, kv_heads, P_r, head_dim) to Pmax; None rows get none.

    Differentiable: training passes the encoders' live output and gradients flow back through the pad.
    """
    template = next((p for p in prefixes if p is not None), None)
    lengths = [0 if p is None else int(p.shape[2]) for p in prefixes]
    pmax = max(lengths, default=0)
    device = device if device is not None else (template.device if template is not None else "cpu")
    lengths_t = torch.tensor(lengths, device=device, dtype=torch.long)
    positions = torch.arange(pmax, device=device)
    mask = (positions[None, :] >= (pmax - lengths_t)[:, None]).long()  # (B, Pmax), ones on the right
    if template is None:
        return PrefixBatch(None, mask, lengths_t)
    dtype = dtype or template.dtype
    two_l, heads, _, dim = template.shape
    rows = []
    cache: dict[int, torch.Tensor] = {}  # the same adapter on many rows is padded once
    for p in prefixes:
        if p is None:
            rows.append(torch.zeros(two_l, heads, pmax, dim, device=device, dtype=dtype))
            continue
        key = id(p)
        if key not in cache:
            cache[key] = F.pad(p.to(device=device, dtype=dtype), (0, 0, pmax - p.shape[2], 0))
        rows.append(cache[key])  # (2L, kv_heads, Pmax, head_dim)
    kv = torch.stack(rows, dim=1)  # (2L, B, kv_heads, Pmax, head_dim)
    return PrefixBatch(kv, mask, lengths_t)


def extend_inputs(
    batch: PrefixBatch, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask over [prefix | tokens] and position ids for the tokens.

    Real token j of row r sits at position P_r + j, as PEFT places it, so a row without a prefix is
    exactly the base model; left pads get a clamped position and are masked out anyway.
    """
    attention_mask = attention_mask.to(batch.mask.device)
    full = torch.cat([batch.mask, attention_mask.long()], dim=1)  # (B, Pmax + T)
    steps = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return full, batch.lengths[:, None] + steps


class _PrefixLayer(DynamicLayer):
    """Returns prefix ++ new keys without storing them.

    Idempotent, so a layer may run twice (gradient checkpointing replays it in backward) and the
    prefix is still there exactly once; this is why training can checkpoint where PEFT refuses.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values  # (B, kv_heads, Pmax, head_dim)

    def update(self, key_states, value_states, *args, **kwargs):
        keys = torch.cat([self.keys, key_states], dim=-2)  # (B, kv_heads, Pmax + T, head_dim)
        values = torch.cat([self.values, value_states], dim=-2)  # (B, kv_heads, Pmax + T, head_dim)
        return keys, values


class PrefixCache(DynamicCache):
    """A read-only cache holding only the prefixes: for training and single forward passes."""

    def __init__(self, batch: PrefixBatch):
        kv = batch.kv
        layers = [_PrefixLayer(kv[2 * i], kv[2 * i + 1]) for i in range(kv.shape[0] // 2)]
        super(DynamicCache, self).__init__(layers=layers)


def training_cache(batch: PrefixBatch) -> PrefixCache | None:
    return None if batch.kv is None else PrefixCache(batch)


def generation_cache(batch: PrefixBatch) -> DynamicCache:
    """A growing cache that starts with the prefixes: decode steps append to it."""
    if batch.kv is None:
        return DynamicCache()
    kv = batch.kv.detach()
    return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(kv.shape[0] // 2)])


def allow_checkpointing_with_prefix(model: torch.nn.Module) -> int:
    """Let HF's checkpointed layers keep our cache (they drop any cache by default).

    Safe only because PrefixCache is idempotent; returns how many layers were switched so callers
    can fail loudly if a transformers release renames the hook.
    """
    switched = 0
    for module in model.modules():
        if hasattr(type(module), "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True
            switched += 1
    return switched
