"""A running batch of decoding rows, each with its own prefix; rows can join and leave between steps.

This is the engine's only model-facing code: offline `PrefixLM.generate` runs one batch to the end,
the server's scheduler merges new rows in and drops finished ones (continuous batching).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from prefixtune.prefix.inject import extend_inputs, generation_cache, stack_prefixes


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(item[0], item[1]) for item in cache]  # each (B, kv_heads, L, head_dim)


class RunningBatch:
    """KV cache + attention mask + next positions for B rows that decode together."""

    def __init__(self, model, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor):
        self.model = model
        self.cache = cache
        self.mask = mask  # (B, L) 1 = a real prefix or token slot of that row
        self.next_pos = next_pos  # (B,) position id of each row's next token

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @classmethod
    @torch.no_grad()
    def prefill(
        cls,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefixes: Sequence[torch.Tensor | None],
    ) -> tuple[RunningBatch, torch.Tensor]:
        """Run left-padded prompts (B, T) with their prefixes; returns the batch and last logits (B, V)."""
        dtype = next(model.parameters()).dtype
        batch = stack_prefixes(prefixes, device=input_ids.device, dtype=dtype)
        full_mask, positions = extend_inputs(batch, attention_mask)
        out = model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=generation_cache(batch),
            use_cache=True,
            logits_to_keep=1,
        )
        state = cls(model, out.past_key_values, full_mask, positions[:, -1] + 1)
        return state, out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns next-token logits (B, V)."""
        ones = torch.ones(len(self), 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)  # (B, L + 1)
        out = self.model(
            input_ids=tokens.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.next_pos.view(-1, 1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1].float()

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then drop slots no remaining row uses."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)  # (B', L)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in _cache_tensors(self.cache)
        ]  # each (B', kv_heads, L - start, head_dim)
        self.cache = DynamicCache(kv)
        self.mask = mask[:, start:]
        self.next_pos = self.next_pos.index_select(0, index)

    def merge(self, other: RunningBatch) -> None:
        """Append other's rows; the shorter side is left-padded (masked) to the longer length."""
        length = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = length - t.shape[-dim_from_end]
            return t if missing == 0 else F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0))

        kv = []
        for (k1, v1), (k2, v2) in zip(_cache_tensors(self.cache), _cache_tensors(other.cache)):
            k = torch.cat([pad(k1, 2), pad(k2, 2)], dim=0)  # (B1 + B2, kv_heads, length, head_dim)
            v = torch.cat([pad(v1, 2), pad(v2, 2)], dim=0)  # (B1 + B2, kv_heads, length, head_dim)
            kv.append((k, v))
        self.cache = DynamicCache(kv)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], dim=0)  # (B1 + B2, length)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
