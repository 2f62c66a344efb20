"""Per-slot KV storage: one (slots, kv_heads, capacity, head_dim) buffer per layer for keys and one for values.

Rows occupy slots 0..n-1 in `order`; row r's prefix sits in columns 0..P_r-1 and its tokens after it, so column c
is position c (PEFT's placement, no padding between prefix and prompt). A row leaving is replaced by the last
slot's row (one row's columns copied), so rows 0..n-1 stay a contiguous view and joining or leaving costs
O(that row), never a copy of the whole batch. The buffers double in slots or capacity when they run out
(amortised; the only whole-store copy, and a rare one) and are freed when the last row leaves.

Every row attends over the store's first `width` columns, its own unwritten ones masked; a masked value still
enters the weighted sum (0 x NaN is NaN), so those columns must hold finite values. Zeroing a grown buffer whole
cost 400 ms for SmolLM2 at 9 x 1502 columns (the page faults of 600 MB), a stall for every running stream when a
long prompt joined. So buffers grow uninitialised and `clean` tracks the columns known finite in every used
slot (every row's data lies below it): a row placed in a slot zeroes its own tail up to `clean`, and `ensure`
zeroes new columns of the used slots before a forward reaches them, 64 at a time, or a slab per step when the
runner grows the store ahead of a long prompt.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from prefixtune.prefix.shapes import PrefixShape

INITIAL_CAPACITY = 128  # columns per slot before the first doubling
ZERO_AHEAD = 64  # columns zeroed at once when the attended width passes `clean`


class SlotKV:
    def __init__(self, shape: PrefixShape, max_rows: int, device: torch.device, dtype: torch.dtype):
        self.shape, self.max_rows, self.device, self.dtype = shape, max_rows, device, dtype
        self.order: list[Hashable] = []  # key of each slot's row, slot order
        self.lengths: list[int] = []  # columns filled per slot (prefix + tokens)
        self.keys: list[torch.Tensor] = []  # per layer (S, kv_heads, C, head_dim)
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None  # (S, V) latest next-token logits per slot
        self.clean = 0  # columns [0, clean) hold finite values in every used slot

    def __len__(self) -> int:
        return len(self.order)

    def slot(self, key: Hashable) -> int:
        return self.order.index(key)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` slots of `columns` columns (doubling: amortised O(1) per row and column)."""
        s = self.shape
        if not self.keys:
            slots, cap = min(self.max_rows, max(4, rows)), max(INITIAL_CAPACITY, columns)
            size = (slots, s.kv_heads, cap, s.head_dim)  # (S, kv_heads, C, head_dim)
            self.keys = [torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(s.num_layers)]
            self.values = [torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(s.num_layers)]
            self.clean = 0
            return
        slots, cap = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= slots and columns <= cap:
            return
        new_slots = slots if rows <= slots else max(rows, min(self.max_rows, 2 * slots))
        new_cap = cap if columns <= cap else max(columns, 2 * cap)
        used, keep = len(self.order), self.clean
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty((new_slots, old.shape[1], new_cap, old.shape[3]))  # (S', kv_heads, C', hd)
                grown[:used, :, :keep] = old[:used, :, :keep]  # the rows' data and their finite tails
                store[i] = grown
        if self.logits is not None and new_slots > self.logits.shape[0]:
            grown = self.logits.new_zeros((new_slots, self.logits.shape[1]))  # (S', V)
            grown[:used] = self.logits[:used]
            self.logits = grown

    def ensure(self, width: int, limit: int | None = None) -> None:
        """Columns [0, width) finite in every used slot. Zeroes ZERO_AHEAD columns at a time (a decode step widens
        by one); `limit` caps the new columns of this call (the runner's growth ahead of a long prompt)."""
        if width <= self.clean:
            return
        stop = min(self.capacity, max(width, self.clean + ZERO_AHEAD))
        if limit is not None:
            stop = min(stop, self.clean + limit)
        used = len(self.order)  # every used row's data lies in [0, clean): nothing of it is zeroed
        for store in (self.keys, self.values):
            for t in store:
                t[:used, :, self.clean:stop] = 0  # (B, kv_heads, new columns, head_dim)
        self.clean = stop

    def _tail(self, slot: int, n: int) -> None:
        """A row placed in `slot` holding n columns: zero its columns [n, clean) (O(that row))."""
        if n < self.clean:
            for store in (self.keys, self.values):
                for t in store:
                    t[slot, :, n:self.clean] = 0  # (kv_heads, clean - n, head_dim)

    def append(self, key: Hashable, prefix: torch.Tensor | None, columns: int) -> int:
        """A new last row holding `prefix` (2L, kv_heads, P, head_dim) or nothing; room for `columns` columns."""
        slot, p = len(self.order), 0 if prefix is None else int(prefix.shape[2])
        self.reserve(slot + 1, max(columns, p) + 1)
        self.ensure(p)  # the other rows' columns up to p first: a row's data never lies beyond `clean`
        if prefix is not None:
            for layer in range(self.shape.num_layers):
                self.keys[layer][slot, :, :p] = prefix[2 * layer]  # (kv_heads, P, head_dim)
                self.values[layer][slot, :, :p] = prefix[2 * layer + 1]  # (kv_heads, P, head_dim)
        self._tail(slot, p)
        self.order.append(key)
        self.lengths.append(p)
        return slot

    def copy_from(self, other: SlotKV, src: int, key: Hashable) -> int:
        """Append a row continuing `other`'s slot `src` (its columns and its logits)."""
        n, slot = other.lengths[src], len(self.order)
        self.reserve(slot + 1, n + 1)
        self.ensure(n)
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for t, o in zip(mine, theirs):
                t[slot, :, :n] = o[src, :, :n]  # (kv_heads, n, head_dim)
        self._tail(slot, n)
        if other.logits is not None:
            self.set_logits(slot, other.logits[src])
        self.order.append(key)
        self.lengths.append(n)
        return slot

    def set_logits(self, slot: int, logits: torch.Tensor) -> None:
        if self.logits is None or self.logits.shape[0] < self.keys[0].shape[0]:
            grown = logits.new_zeros((self.keys[0].shape[0], logits.shape[-1]))  # (S, V)
            if self.logits is not None:
                grown[:self.logits.shape[0]] = self.logits
            self.logits = grown
        self.logits[slot] = logits

    def remove(self, key: Hashable) -> None:
        """Drop one row; the last slot's row moves into its place (O(one row))."""
        slot, last = self.slot(key), len(self.order) - 1
        if slot != last:
            n = max(self.lengths[last], self.clean)  # its data and its finite tail
            for store in (self.keys, self.values):
                for t in store:
                    t[slot, :, :n] = t[last, :, :n]  # (kv_heads, n, head_dim)
            if self.logits is not None:
                self.logits[slot] = self.logits[last]
            self.order[slot], self.lengths[slot] = self.order[last], self.lengths[last]
        self.order.pop()
        self.lengths.pop()
        self.release()

    def move(self, moves: list[tuple[Hashable, Hashable]]) -> None:
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
        if self.logits is not None:
            self.logits[dst] = self.logits[src]  # (M, V)
        lengths = [self.lengths[slot[s]] for _, s in moves]
        for (d, _), length in zip(moves, lengths):
            self.lengths[slot[d]] = length

    def clear(self) -> None:
        self.order, self.lengths = [], []
        self.release()

    def release(self) -> None:
        """Free the buffers when no row is left: one long request must not keep its capacity for ever."""
        if not self.order:
            self.keys, self.values, self.logits, self.clean = [], [], None, 0
