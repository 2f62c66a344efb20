"""The LRU of folded adapters a PrefixLM keeps on its device, bounded by count and bytes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixtune.adapter_folder import Manifest


@dataclass
class CachedAdapter:
    """A folded adapter ready to inject."""

    kv: torch.Tensor  # (2L, kv_heads, P, head_dim) on the model's device and dtype
    manifest: Manifest | None  # None for a bare PEFT folder
    load_ms: float  # time it took to read from disk and place on the device
    stamp: tuple[int, ...] = ()  # (inode, mtime_ns, size) of the weights file it was read from
    folder: Path | None = None  # where it was read from

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class AdapterCache:
    """LRU of folded prefixes, bounded by count and bytes; evicts the least recently used.

    The entry just added is never evicted, so one adapter larger than max_bytes still works (alone).
    """

    def __init__(self, max_adapters: int = 64, max_bytes: int | None = None):
        if max_adapters < 1:
            raise ValueError(f"the adapter cache must hold at least 1 adapter, got max_adapters={max_adapters}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive or None (no byte limit), got {max_bytes}")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedAdapter] = OrderedDict()
        self.evictions = 0  # adapters pushed out since creation
        self._bytes = 0

    def get(self, name: str) -> CachedAdapter | None:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
        return item

    def put(self, name: str, item: CachedAdapter) -> None:
        self.drop(name)
        self._items[name] = item
        self._bytes += item.nbytes
        while len(self._items) > self.max_adapters or (
            self.max_bytes is not None and self._bytes > self.max_bytes and len(self._items) > 1
        ):
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1

    def drop(self, name: str) -> bool:
        item = self._items.pop(name, None)
        if item is not None:
            self._bytes -= item.nbytes
        return item is not None

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def names(self) -> list[str]:
        """Cached adapters, least recently used first."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
