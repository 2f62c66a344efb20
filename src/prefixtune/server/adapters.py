"""Which adapters the server offers, and hot loading/unloading them while it serves.

Served = every adapter in the store plus those loaded by path, minus those unloaded through DELETE (remembered
in memory until loaded again). Names are answered from memory: listing a store of 500 adapters took 15.8 ms,
so doing it per request capped the server near 60 requests/s and blocked every stream meanwhile. The store
folder is re-listed off the event loop when its modification time changes (a new adapter folder is renamed in,
which changes it) or every RESCAN_S seconds, whichever comes first; the event loop only stats the folder.

Adapter weights are read from disk on a worker thread (run_in_threadpool), never on the event loop; the lock
guarding PrefixLM's LRU is held only there and by admin calls, and the engine never takes it for requests the
server submits (they carry their prefix), so no stream waits for a disk read.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from starlette.concurrency import run_in_threadpool

from prefixtune.adapter_folder import ManifestError, StoreError, validate_name
from prefixtune.engine.compose import Experts, is_composed
from prefixtune.errors import user_error_types
from prefixtune.server.compose import check_composed, prepare_composed
from prefixtune.server.protocol import APIError
from prefixtune.server.security import snapshot_adapter
from prefixtune.prefix.peft_io import AdapterFormatError

RESCAN_S = 5.0  # at most this stale when the folder's mtime cannot tell (e.g. a file rewritten in place)


@dataclass
class Prepared:
    """What a generation request needs from the registry, resolved off the event loop."""

    prefix: torch.Tensor | None  # (2L, kv_heads, P, head_dim) or None for the base model
    guidance_scale: float  # 1 = off
    negative: str | None  # unconditioned adapter of a guided request (None = the base model)
    negative_prefix: torch.Tensor | None  # its folded kv
    experts: Experts | None = None  # a composed model's product of experts (its rows' prefixes resolved)

    @property
    def virtual(self) -> int:
        if self.experts is not None:
            return self.experts.virtual
        return max(0 if p is None else int(p.shape[2]) for p in (self.prefix, self.negative_prefix))


class AdapterRegistry:
    def __init__(self, lm, lock: threading.RLock, base_ids: set[str], roots: list[Path], on_change=None):
        self.lm = lm
        # An engine in another process keeps its own adapter cache: admin loads/unloads are mirrored there
        # (EngineClient.adapter_changed(op, name, path)).
        self.on_change = on_change
        self.lock = lock
        self.base_ids = base_ids  # model ids that mean "no adapter"
        self.roots = roots  # folders POST /v1/adapters may load from by path
        self.hidden: frozenset[str] = frozenset()  # store adapters unloaded through DELETE
        self.by_path: dict[str, Path] = {}  # name -> private copy of a folder loaded by path
        self._store: frozenset[str] = frozenset()  # store listing as of the last scan
        self._served: frozenset[str] = frozenset()  # what names() answers; replaced whole, never mutated
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, inode) of the store root at that scan
        self._scanned_at = 0.0
        self._scan_lock = threading.Lock()
        self.rescan()

    # ---- names (memory) ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._served)

    def loaded(self) -> int:
        return len(self.lm.cache)

    def _root_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.lm.store.root)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def stale(self) -> bool:
        """One stat of the store root (microseconds): has the listing possibly changed?"""
        return self._root_stamp() != self._stamp or time.monotonic() - self._scanned_at > RESCAN_S

    def rescan(self) -> None:
        """List the store (blocking: call it off the event loop)."""
        with self._scan_lock:
            stamp = self._root_stamp()
            self._store = frozenset(self.lm.store.names())
            self._stamp, self._scanned_at = stamp, time.monotonic()
            self._publish()

    def _publish(self) -> None:
        self._served = frozenset((self._store | set(self.by_path) | set(self.lm.paths)) - self.hidden
                                 - self.base_ids)

    async def refresh(self) -> None:
        if self.stale():
            await run_in_threadpool(self.rescan)

    def lookup(self, model: str) -> str | None:
        """As resolve, from memory only (any thread): None for the base model, 404 if not served."""
        if model in self.base_ids:
            return None
        if model not in self._served:
            raise APIError(404, f"The model `{model}` does not exist. See GET /v1/models.", param="model",
                           code="model_not_found")
        return model

    async def resolve(self, model: str) -> str | None:
        """Adapter name for a request's `model` (None = the base model); 404 if not served."""
        if model in self.base_ids:
            return None
        if is_composed(model):  # "a+b": every part served (each checked as a name of its own)
            for part in check_composed(model, self.lm.max_compose, self.base_ids):
                await self.resolve(part)
            return model
        if model not in self._served:
            await self.refresh()  # written into the store a moment ago?
            if model not in self._served:
                raise APIError(404, f"The model `{model}` does not exist. See GET /v1/models.", param="model",
                               code="model_not_found")
        return model

    # ---- weights (blocking: worker threads only) -----------------------------------------------------
    def prefix(self, name: str | None, param: str = "model") -> torch.Tensor | None:
        """The adapter's folded kv (2L, kv_heads, P, head_dim), read from disk on first use."""
        if name is None:
            return None
        try:
            with self.lock:
                return self.lm.adapter(name).kv
        except (AdapterFormatError, ManifestError) as err:
            # A damaged file in the store is the server's fault, not the request's: a 5xx that monitoring
            # counts, naming the file so the operator can replace it. Other adapters are unaffected.
            raise APIError(500, f"adapter {name!r} is damaged on the server: {err}", "server_error", param=param,
                           code="adapter_damaged") from err
        except user_error_types() as err:
            raise APIError(400, f"adapter {name!r} cannot be used: {err}", param=param,
                           code="adapter_incompatible") from err

    def prepare(self, adapter: str | None, scale: float | None, negative: str | None, mode: str | None = None,
                weights: list[float] | None = None, beams: bool = False) -> Prepared:
        """Prefix and guidance of a request: given values win, else the adapter manifest's recommendation."""
        if mode is not None or weights is not None or is_composed(adapter):
            experts = prepare_composed(self, adapter, scale, negative, mode, weights, beams)
            if experts is not None:
                return Prepared(None, 1.0, None, None, experts)
        prefix = self.prefix(adapter)
        if negative is not None and negative.lower() != "none":
            if negative in self.base_ids:
                negative = "none"
            elif negative not in self._served:
                raise APIError(400, f"guidance_negative {negative!r} is not a served adapter (an adapter name, or "
                               "\"none\" for the base model)", param="guidance_negative", code="model_not_found")
        try:
            with self.lock:
                scale, negative = self.lm.guidance(adapter, scale, negative)
        except (ValueError, *user_error_types()) as err:
            param = "guidance_negative" if negative is not None and "negative" in str(err) else "guidance_scale"
            raise APIError(400, str(err), param=param) from err
        negative_prefix = self.prefix(negative, "guidance_negative") if scale != 1.0 else None
        return Prepared(prefix, scale, negative if scale != 1.0 else None, negative_prefix)

    # ---- admin (blocking) ----------------------------------------------------------------------------
    def load(self, name: str, path: str | None) -> dict:
        """Load (or reload) `name` from the store, or from `path` under an allowed root."""
        try:
            validate_name(name)
        except StoreError as err:
            raise APIError(400, str(err), param="name") from err
        if name in self.base_ids:
            raise APIError(400, f"{name!r} is the base model's id; choose another adapter name", param="name")
        folder, copy = snapshot_adapter(path, self.roots) if path is not None else (None, None)
        with self.lock:
            if folder is None and not self.lm.store.exists(name) and name not in self.lm.paths:
                raise APIError(404, f"no adapter {name!r} in the store {self.lm.store.root}", param="name",
                               code="adapter_not_found")
            self.lm.cache.drop(name)  # reload from disk: the folder may have been replaced
            previous = self.lm.paths.get(name)  # a failed reload keeps a by-path registration
            try:
                if copy is not None:
                    self.lm.register(name, copy)
                item = self.lm.adapter(name)
            except Exception as err:  # noqa: BLE001 - whatever broke, roll back so no broken name stays listed
                self._restore(name, previous, copy)
                raise APIError(400, f"cannot load adapter {name!r}: {err}", param="path" if folder else "name",
                               code="adapter_invalid") from err
        # The engine process mirrors it outside the lock: a stalled or dead core never blocks the requests
        # that take the lock, and the name is served only once both sides hold it.
        self._mirror("load", name, None if copy is None else str(copy), lambda: self._restore(name, previous, copy))
        with self.lock:
            if copy is not None:
                self._forget_copy(name)
                self.by_path[name] = copy
            self.hidden = self.hidden - {name}
            self._publish()
        return {"id": name, "object": "model", "num_virtual_tokens": int(item.kv.shape[2]),
                "load_ms": round(item.load_ms, 2), "source": str(folder or self.lm.store.path(name))}

    def _restore(self, name: str, previous: Path | None, copy: Path | None) -> None:
        """Undo a load that failed here or in the engine process: the registration before it, no new copy."""
        with self.lock:
            self.lm.unload(name)
            if previous is not None:
                self.lm.register(name, previous)
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)

    def _mirror(self, op: str, name: str, path: str | None, undo=None) -> None:
        """The engine process's side of an admin change (nothing to do in one process); on failure, undo ours."""
        if self.on_change is None:
            return
        try:
            self.on_change(op, name, path)
        except Exception as err:  # noqa: BLE001 - served here but not there would fail every request
            if undo is not None:
                undo()
            raise APIError(503, f"adapter {name!r}: {err}", "server_error", code="engine_unavailable") from err

    def unload(self, name: str) -> dict:
        if self.stale():
            self.rescan()
        if name not in self._served:
            raise APIError(404, f"adapter {name!r} is not served", param="name", code="adapter_not_found")
        self._mirror("unload", name, None)  # first: a failed unload there leaves both sides as they were
        with self.lock:
            self.lm.unload(name)
            self._forget_copy(name)
            if self.lm.store.exists(name):
                self.hidden = self.hidden | {name}  # still on disk: keep it out of /v1/models until loaded again
            self._publish()
        return {"id": name, "object": "model", "deleted": True}

    def _forget_copy(self, name: str) -> None:
        old = self.by_path.pop(name, None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Remove the private copies of adapters loaded by path."""
        for name in list(self.by_path):
            self._forget_copy(name)
