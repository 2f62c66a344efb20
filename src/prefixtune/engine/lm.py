"""PrefixLM: one frozen base model, many adapters, swapped or mixed per row without reloading."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefixtune.engine.generate import generate_ids
from prefixtune.engine.sampling import SamplingParams
from prefixtune.prefix.encoder import flat_to_kv
from prefixtune.prefix.peft_io import load_adapter
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.store import AdapterStore, Manifest, check_compatible, default_store, read_manifest


@dataclass
class Generation:
    """One prompt's result."""

    text: str  # generated text (stop string cut off)
    tokens: list[int]  # generated token ids
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # tokens in the prompt
    adapter: str | None  # adapter used (None = base model)


@dataclass
class CachedAdapter:
    kv: torch.Tensor  # (2L, kv_heads, P, head_dim) on the model's device and dtype
    manifest: Manifest | None
    load_ms: float  # time it took to read from disk and place on the device


class AdapterCache:
    """LRU of folded prefixes, bounded by count and bytes; evicts the least recently used."""

    def __init__(self, max_adapters: int = 64, max_bytes: int | None = None):
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedAdapter] = OrderedDict()
        self.evictions = 0

    def get(self, name: str) -> CachedAdapter | None:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
        return item

    def put(self, name: str, item: CachedAdapter) -> None:
        self._items[name] = item
        self._items.move_to_end(name)
        while len(self._items) > self.max_adapters or (
            self.max_bytes is not None and self.nbytes > self.max_bytes and len(self._items) > 1
        ):
            self._items.popitem(last=False)
            self.evictions += 1

    def drop(self, name: str) -> bool:
        return self._items.pop(name, None) is not None

    @property
    def nbytes(self) -> int:
        return sum(i.kv.numel() * i.kv.element_size() for i in self._items.values())

    def names(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


class PrefixLM:
    """Generate with any adapter of a store; a batch may mix adapters and base-model rows (None)."""

    def __init__(self, loaded, store: AdapterStore | None = None, cache_size: int = 64,
                 cache_bytes: int | None = None, force: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.shape = prefix_shape(self.model.config)
        self.store = store or AdapterStore(default_store())
        self.cache = AdapterCache(cache_size, cache_bytes)
        self.force = force
        self.paths: dict[str, Path] = {}  # adapters registered from outside the store

    @classmethod
    def load(cls, model: str = "smollm2-135m", store: str | Path | None = None, device: str | None = None,
             dtype: str | None = None, **kwargs: Any) -> PrefixLM:
        from prefixtune.models import load_base_model

        root = Path(store) if store is not None else default_store()
        return cls(load_base_model(model, device=device, dtype=dtype), AdapterStore(root), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- adapters -------------------------------------------------------------------------------
    def register(self, name: str, folder: str | Path) -> None:
        """Serve an adapter from a folder outside the store under `name`."""
        self.paths[name] = Path(folder)
        self.cache.drop(name)

    def unload(self, name: str) -> bool:
        self.paths.pop(name, None)
        return self.cache.drop(name)

    def available(self) -> list[str]:
        return sorted(set(self.store.names()) | set(self.paths))

    def adapter(self, name: str) -> CachedAdapter:
        """Folded prefix of `name`, from the LRU or from disk (checked against the base model)."""
        item = self.cache.get(name)
        if item is not None:
            return item
        start = time.perf_counter()
        folder = self.paths.get(name) or self.store._existing(name)
        loaded = load_adapter(folder, self.shape)
        manifest = read_manifest(folder)
        warning = check_compatible(manifest, self.shape, self.loaded.fingerprint, self.loaded.name, self.force)
        if warning:
            print(warning)
        dtype = next(self.model.parameters()).dtype
        kv = flat_to_kv(loaded.flat, self.shape).to(self.device, dtype).contiguous()  # (2L, kv, P, hd)
        item = CachedAdapter(kv, manifest, (time.perf_counter() - start) * 1000)
        self.cache.put(name, item)
        return item

    def template(self, name: str | None) -> str | None:
        if name is None:
            return None
        manifest = self.adapter(name).manifest
        return manifest.template if manifest else None

    def render(self, prompt: str, adapter: str | None, label: str | None = None, chat: bool = False) -> str:
        """Fill the adapter's training template for `label` (the text after it is `prompt`)."""
        if label is not None:
            template = self.template(adapter)
            if template is None:
                raise ValueError(f"adapter {adapter!r} has no training template; pass the whole prompt instead")
            prompt = template.format(label=label) + (" " + prompt if prompt else "")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"{self.loaded.name} has no chat template; drop --chat")
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        return prompt

    # ---- generation -----------------------------------------------------------------------------
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
        return {i for i in ids if i is not None}

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        lengths = enc.attention_mask.sum(-1).tolist()
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device), lengths

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        adapters: Sequence[str | None] | str | None = None,
        max_new_tokens: int = 40,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int | None] | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
    ) -> list[Generation]:
        """One result per prompt; rows may use different adapters (None = the base model)."""
        if isinstance(adapters, str) or adapters is None:
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        params = [
            SamplingParams(max_new_tokens, temperature, top_p, top_k, s, list(stop or []), ignore_eos)
            for s in seeds
        ]
        for p in params:
            p.validate()
        prefixes = [None if a is None else self.adapter(a).kv for a in adapters]
        input_ids, mask, lengths = self.encode(prompts)
        outs = generate_ids(self.model, input_ids, mask, prefixes, params, self.eos_ids(),
                            self._stop_check(params))
        results = []
        for out, p, n, name in zip(outs, params, lengths, adapters):
            text, _ = cut_at_stop(self.tokenizer.decode(out.tokens, skip_special_tokens=True), p.stop)
            results.append(Generation(text, out.tokens, out.finish_reason or "length", n, name))
        return results

    def _stop_check(self, params: Sequence[SamplingParams]):
        if not any(p.stop for p in params):
            return None

        def check(row: int, tokens: list[int]) -> bool:
            stops = params[row].stop
            # Only the tail can hold a new stop string; decode a window, not the whole output.
            return bool(stops) and cut_at_stop(self.tokenizer.decode(tokens[-16:]), stops)[1]

        return check


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
