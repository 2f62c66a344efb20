"""The `prefixtune` extension field of /v1/models entries: which adapter is which (base model, template, labels).

Read from each adapter's manifest (prefixtune.json) and cached by the file's stat, so listing 500 adapters costs
500 stats, not 500 JSON reads; it runs on a worker thread, never on the event loop. Only the manifest is read:
listing never loads an adapter's weights.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from prefixtune.adapter_folder import MANIFEST_FILE, read_manifest
from prefixtune.errors import UserError


class CardInfo:
    def __init__(self, lm):
        self.lm = lm
        self._lock = threading.Lock()  # worker threads of concurrent listings share the cache
        self._cache: dict[str, tuple[tuple | None, Path, dict[str, Any]]] = {}

    def base(self, adapters: int) -> dict[str, Any]:
        return {"kind": "base", "adapters": adapters}

    def adapter(self, name: str) -> dict[str, Any]:
        """The extension field of adapter `name`'s card (kind, base model, template, labels, virtual tokens)."""
        folder = self.lm.paths.get(name) or self.lm.store.folder(name)
        try:
            st = os.stat(Path(folder) / MANIFEST_FILE)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and hit[0] == stamp and hit[1] == folder:
            return hit[2]
        info = _describe(folder)
        with self._lock:
            self._cache[name] = (stamp, folder, info)
        return info

    def cards(self, names: list[str]) -> dict[str, dict[str, Any]]:
        return {name: self.adapter(name) for name in names}


def _describe(folder: Path) -> dict[str, Any]:
    try:
        manifest = read_manifest(folder)
    except (OSError, UserError) as err:
        return {"kind": "prefix", "problem": f"{type(err).__name__}: {err}"}
    if manifest is None:  # a bare PEFT folder copied in by hand
        return {"kind": "prefix", "base_model": None, "template": None, "labels": None}
    return {"kind": "prefix", "base_model": manifest.base_model, "template": manifest.template,
            "label": manifest.label, "labels": manifest.labels, "fields": manifest.fields,
            "num_virtual_tokens": manifest.prefix.get("num_virtual_tokens"),
            "guidance": manifest.guidance or None}
