"""Model runner: owns the KV state of the running rows and runs prefill and decode for them.

KV lives in preallocated per-slot buffers, one (slots, kv_heads, capacity, head_dim) tensor per layer for
keys and one for values. Row r's prefix sits in columns 0..P_r-1 and its tokens after it, so column c is
position c (PEFT's placement, no padding between prefix and prompt). Running rows occupy slots 0..B-1:
  - a row joining is prefilled with its fellow newcomers, then its own columns are copied into a free slot;
  - a row leaving is replaced by the last slot's row (one row's KV copied);
so joining or leaving costs O(that row), never a copy of the whole batch (RunningBatch.select/merge did that).
A decode step writes each row's new key/value at its own column and attends over slots[:B, :, :W] (a view;
W = longest row + 1) with a per-row mask. The buffers double in slots or capacity when they run out
(amortised; the only whole-cache copy, and a rare one).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from prefixtune.engine.decode import RunningBatch, _cache_tensors

INITIAL_CAPACITY = 128  # columns per slot before the first doubling


class _SlotLayer(DynamicLayer):
    """One layer's view of the runner's slot buffers during a decode step."""

    def __init__(self, runner: ModelRunner, index: int):
        super().__init__()
        self.runner, self.index = runner, index
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        r = self.runner
        keys, values = r.keys[self.index], r.values[self.index]  # (S, kv_heads, C, head_dim)
        # key_states (B, kv_heads, 1, head_dim): row b's new entry goes to column write[b] of slot b.
        keys[r.slot_index, :, r.write] = key_states[:, :, 0]
        values[r.slot_index, :, r.write] = value_states[:, :, 0]
        b, w = r.size, r.width
        return keys[:b, :, :w], values[:b, :, :w]  # (B, kv_heads, W, head_dim) views, no copy

    def get_seq_length(self) -> int:
        return self.runner.width - 1

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.runner.width, 0


class _SlotCache(Cache):
    def __init__(self, runner: ModelRunner, layers: int):
        super().__init__(layers=[_SlotLayer(runner, i) for i in range(layers)])


class ModelRunner:
    """Rows are identified by hashable keys; `order[s]` is the key in slot s."""

    def __init__(self, model, max_rows: int, share_prefill: bool = True):
        self.model = model
        self.max_rows = max_rows
        self.share_prefill = share_prefill  # prefill identical new rows once (off: the benchmark's baseline)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.order: list[Hashable] = []  # key of each running slot, slot order
        self.lengths: list[int] = []  # columns filled per running slot (prefix + tokens)
        self.keys: list[torch.Tensor] = []  # per layer (S, kv_heads, C, head_dim)
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None  # (S, V) latest next-token logits per slot
        self._cache: _SlotCache | None = None
        # Sliding-window attention (Mistral, Qwen2 with use_sliding_window, Gemma2/3 layers): the 4-D mask we pass
        # is used as is, so it must carry the window itself; mixed models take one mask per layer type.
        config = model.config
        window = getattr(config, "sliding_window", None)
        self.window = window if isinstance(window, int) and window > 0 else None
        types = set(getattr(config, "layer_types", None) or [])
        self.mixed_layers = self.window is not None and "full_attention" in types and len(types) > 1
        # Set for the duration of one decode step (read by _SlotLayer.update).
        self.size = 0
        self.width = 0
        self.write = torch.zeros(0, dtype=torch.long)
        self.slot_index = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.order)

    def slot(self, key: Hashable) -> int:
        return self.order.index(key)

    # ---- storage ---------------------------------------------------------------------------------------
    def _reserve(self, rows: int, columns: int, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make room for `rows` slots of `columns` columns (doubling: amortised O(1) per row and column)."""
        if not self.keys:
            slots = min(self.max_rows, max(4, rows))
            cap = max(INITIAL_CAPACITY, columns)
            for k, _ in like:  # (B, kv_heads, L, head_dim) from a prefill: copy its layout
                shape = (slots, k.shape[1], cap, k.shape[3])
                self.keys.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
                self.values.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
            self._cache = _SlotCache(self, len(self.keys))
            return
        slots, cap = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= slots and columns <= cap:
            return
        new_slots = slots if rows <= slots else min(self.max_rows, max(rows, 2 * slots))
        new_cap = cap if columns <= cap else max(columns, 2 * cap)
        used, width = len(self.order), max(self.lengths, default=0)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros((new_slots, old.shape[1], new_cap, old.shape[3]))  # (S', kv_heads, C', hd)
                grown[:used, :, :width] = old[:used, :, :width]
                store[i] = grown
        if self.logits is not None and new_slots > self.logits.shape[0]:
            grown = self.logits.new_zeros((new_slots, self.logits.shape[1]))  # (S', V)
            grown[:used] = self.logits[:used]
            self.logits = grown

    # ---- rows join and leave ---------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, keys: Sequence[Hashable], prompts: Sequence[Sequence[int]],
            prefixes: Sequence[torch.Tensor | None], pad_id: int) -> None:
        """Prefill new rows together (left-padded), then move each row's own columns into a free slot.

        Rows with the same prompt and the same prefix tensor (a request's n choices, a beam group's beams) are
        prefilled once and its columns copied to each of them (`share_prefill`).
        """
        first: dict[tuple, int] = {}  # (prompt, prefix identity) -> index of its prefilled row
        unique: list[int] = []  # row of each prefilled prompt
        source: list[int] = []  # prefilled row each new row copies
        for i, (p, kv) in enumerate(zip(prompts, prefixes)):
            sig = (tuple(p), id(kv))  # identity: the caller holds every prefix for the whole call
            if sig not in first or not self.share_prefill:
                first[sig] = len(unique)
                unique.append(i)
            source.append(first[sig])
        prompts = [prompts[i] for i in unique]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (N, T) left-padded
        mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (N, T)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        batch, logits = RunningBatch.prefill(self.model, ids.to(self.device), mask.to(self.device),
                                             [prefixes[i] for i in unique])
        kv = _cache_tensors(batch.cache)  # per layer (N, kv_heads, Pmax + T, head_dim)
        real = [row.nonzero().view(-1) for row in batch.mask]  # columns of row i that hold its prefix/tokens
        start = len(self.order)
        self._reserve(start + len(keys), max(len(c) for c in real) + 1, kv)
        if self.logits is None:
            self.logits = logits.new_zeros((self.keys[0].shape[0], logits.shape[1]))  # (S, V)
        for u, columns in enumerate(real):
            slots = torch.tensor([start + i for i, src in enumerate(source) if src == u], device=self.device)
            n = len(columns)
            for layer, (k, v) in enumerate(kv):
                self.keys[layer][slots, :, :n] = k[u].index_select(1, columns)  # (kv_heads, n, head_dim) to each
                self.values[layer][slots, :, :n] = v[u].index_select(1, columns)  # (kv_heads, n, head_dim) to each
            self.logits[slots] = logits[u]
        self.lengths.extend(len(real[u]) for u in source)
        self.order.extend(keys)

    @torch.no_grad()
    def reorder(self, moves: Sequence[tuple[Hashable, Hashable]]) -> None:
        """For every (dst, src) pair at once, row dst continues from row src's state (a beam forking another).

        All sources are read before any destination is written, so pairs may overlap (beams swapping).
        """
        if not moves:
            return
        slot = {key: i for i, key in enumerate(self.order)}
        dst = torch.tensor([slot[d] for d, _ in moves], device=self.device)
        src = torch.tensor([slot[s] for _, s in moves], device=self.device)
        n = max(self.lengths[slot[s]] for _, s in moves)  # columns past a row's length are never attended
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]  # (M, kv_heads, n, head_dim), gathered before it is written
        self.logits[dst] = self.logits[src]  # (M, V)
        lengths = [self.lengths[slot[s]] for _, s in moves]
        for (d, _), length in zip(moves, lengths):
            self.lengths[slot[d]] = length

    def remove(self, key: Hashable) -> None:
        """Drop one row; the last slot's row moves into its place (O(one row))."""
        slot, last = self.slot(key), len(self.order) - 1
        if slot != last:
            n = self.lengths[last]
            for store in (self.keys, self.values):
                for t in store:
                    t[slot, :, :n] = t[last, :, :n]  # (kv_heads, n, head_dim)
            self.logits[slot] = self.logits[last]
            self.order[slot], self.lengths[slot] = self.order[last], self.lengths[last]
        self.order.pop()
        self.lengths.pop()
        self.release()

    def clear(self) -> None:
        self.order, self.lengths = [], []
        self.release()

    def release(self) -> None:
        """Free the buffers when no row runs: one long request must not keep its capacity for ever."""
        if not self.order:
            self.keys, self.values, self.logits, self._cache = [], [], None, None

    # ---- decode ----------------------------------------------------------------------------------------
    def current_logits(self) -> torch.Tensor:
        return self.logits[:len(self.order)]  # (B, V)

    @torch.no_grad()
    def decode(self, tokens: Sequence[int]) -> None:
        """Feed one token per running slot (slot order); refreshes current_logits()."""
        b = len(self.order)
        self._reserve(b, max(self.lengths) + 1, [])
        self.size, self.width = b, max(self.lengths) + 1
        self.write = torch.tensor(self.lengths, dtype=torch.long, device=self.device)  # (B,) new column = position
        self.slot_index = torch.arange(b, device=self.device)
        columns = torch.arange(self.width, device=self.device).view(1, -1)  # (1, W)
        visible = columns <= self.write.view(-1, 1)  # (B, W): the row's own columns and its new one
        mask = self._additive(visible)
        if self.window is not None:
            # As transformers' sliding overlay: key position > query position - window.
            sliding = self._additive(visible & (columns > (self.write - self.window).view(-1, 1)))
            mask = {"full_attention": mask, "sliding_attention": sliding} if self.mixed_layers else sliding
        out = self.model(
            input_ids=torch.tensor(list(tokens), dtype=torch.long, device=self.device).view(-1, 1),
            attention_mask=mask,  # 4-D (or per layer type): used as is by transformers
            position_ids=self.write.view(-1, 1),
            past_key_values=self._cache,
            use_cache=True,
        )
        self.logits[:b] = out.logits[:, -1].float()
        self.lengths = [n + 1 for n in self.lengths]

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, W) bool -> (B, 1, 1, W) additive mask; a finite floor keeps fully masked math NaN-free."""
        b, w = visible.shape
        mask = torch.zeros((b, 1, 1, w), dtype=self.dtype, device=self.device)  # (B, 1, q=1, W)
        return mask.masked_fill_(~visible.view(b, 1, 1, w), torch.finfo(self.dtype).min)
