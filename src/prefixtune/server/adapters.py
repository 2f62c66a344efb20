"""Which adapters the server offers, and hot loading/unloading them while it serves.

Served = every adapter in the store (listed live, so one written there while serving appears at once) plus
those loaded by path, minus those unloaded through DELETE (remembered in memory until loaded again).
All access to PrefixLM's adapter cache holds the scheduler's lm_lock: the worker thread resolves adapters too.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from prefixtune.errors import user_error_types
from prefixtune.server.protocol import APIError
from prefixtune.server.security import check_adapter_path
from prefixtune.store import StoreError, validate_name


class AdapterRegistry:
    def __init__(self, lm, lock: threading.RLock, base_ids: set[str], roots: list[Path]):
        self.lm = lm
        self.lock = lock
        self.base_ids = base_ids  # model ids that mean "no adapter"
        self.roots = roots  # folders POST /v1/adapters may load from by path
        self.hidden: set[str] = set()  # store adapters unloaded through DELETE

    def names(self) -> list[str]:
        with self.lock:
            return [n for n in self.lm.available() if n not in self.hidden and n not in self.base_ids]

    def loaded(self) -> int:
        return len(self.lm.cache)

    def resolve(self, model: str) -> str | None:
        """Adapter name for a request's `model` (None = the base model); 404 if not served."""
        if model in self.base_ids:
            return None
        if model not in self.names():
            raise APIError(404, f"The model `{model}` does not exist. See GET /v1/models.", param="model",
                           code="model_not_found")
        return model

    def prefix(self, name: str | None) -> torch.Tensor | None:
        """The adapter's folded kv (2L, kv_heads, P, head_dim), read from disk on first use; blocking."""
        if name is None:
            return None
        try:
            with self.lock:
                return self.lm.adapter(name).kv
        except user_error_types() as err:
            raise APIError(400, f"adapter {name!r} cannot be used: {err}", param="model",
                           code="adapter_incompatible") from err

    def load(self, name: str, path: str | None) -> dict:
        """Load (or reload) `name` from the store, or from `path` under an allowed root; blocking."""
        try:
            validate_name(name)
        except StoreError as err:
            raise APIError(400, str(err), param="name") from err
        if name in self.base_ids:
            raise APIError(400, f"{name!r} is the base model's id; choose another adapter name", param="name")
        folder = check_adapter_path(path, self.roots) if path is not None else None
        with self.lock:
            if folder is None:
                if not self.lm.store.exists(name) and name not in self.lm.paths:
                    raise APIError(404, f"no adapter {name!r} in the store {self.lm.store.root}", param="name",
                                   code="adapter_not_found")
                self.lm.cache.drop(name)  # reload from disk: the folder may have been replaced
                previous = self.lm.paths.get(name)  # a failed reload keeps a by-path registration
            else:
                previous = self.lm.paths.get(name)
            try:
                if folder is not None:
                    self.lm.register(name, folder)
                item = self.lm.adapter(name)
            except Exception as err:  # noqa: BLE001 - whatever broke, roll back so no broken name stays listed
                self.lm.unload(name)
                if previous is not None:
                    self.lm.register(name, previous)
                raise APIError(400, f"cannot load adapter {name!r}: {err}", param="path" if folder else "name",
                               code="adapter_invalid") from err
            self.hidden.discard(name)
        return {"id": name, "object": "model", "num_virtual_tokens": int(item.kv.shape[2]),
                "load_ms": round(item.load_ms, 2), "source": str(folder or self.lm.store.path(name))}

    def unload(self, name: str) -> dict:
        with self.lock:
            if name not in self.names():
                raise APIError(404, f"adapter {name!r} is not served", param="name", code="adapter_not_found")
            self.lm.unload(name)
            if self.lm.store.exists(name):
                self.hidden.add(name)  # still on disk: keep it out of /v1/models until loaded again
        return {"id": name, "object": "model", "deleted": True}
