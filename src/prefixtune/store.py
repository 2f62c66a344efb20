"""The adapter library: a folder of adapter folders (adapter_folder.py) beside one frozen base model.

List, load, import, export, rename, remove, and publish several adapters at once. Every change is atomic:
what it writes is staged under a hidden name (never listed) and renamed into place, so a crash never leaves
half an adapter visible.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefixtune.adapter_folder import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    StoreError,
    check_compatible,
    read_manifest,
    shape_dict,
    validate_name,
    write_adapter_folder,
    writing,
)
from prefixtune.fileio import atomic_folder, atomic_write_text, copy_tree, current_umask, swap_in
from prefixtune.fingerprint import (  # noqa: F401 - LegacyFingerprintWarning is part of the store's API
    FINGERPRINT_VERSION,
    LegacyFingerprintWarning,
    is_legacy,
)
from prefixtune.paths import prefixtune_home
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.peft_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoadedAdapter,
    files_problem,
    load_adapter,
    read_peft_config,
)
from prefixtune.prefix.shapes import PrefixShape


@dataclass
class StoredAdapter:
    """One adapter folder as the store sees it."""

    name: str  # folder name = adapter name
    path: Path  # the folder
    manifest: Manifest | None  # None for a bare PEFT folder copied in by hand
    size_bytes: int  # bytes of all files in the folder
    num_virtual_tokens: int | None  # from the PEFT config
    problem: str | None = None  # why it cannot load (a damaged manifest, config or weights file); None = fine


def key_metric(manifest: Manifest | None) -> tuple[str, float] | None:
    """The one number `adapters list` shows: the adapter's own eval loss when it has one."""
    if manifest is None:
        return None
    for key in ("eval_loss_own", "eval_loss", "perplexity"):
        value = manifest.metrics.get(key)
        if isinstance(value, (int, float)):
            return key, float(value)
    return None


class AdapterStore:
    """A folder of adapters: list, load, import, export, rename, remove."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / CONFIG_FILE).is_file()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and _valid(p.name) and (p / CONFIG_FILE).is_file()
        )

    def list(self) -> list[StoredAdapter]:
        return [self.info(n) for n in self.names()]

    def info(self, name: str) -> StoredAdapter:
        """One adapter's entry; a damaged one is returned with its `problem` (listing never fails on it)."""
        folder = self._existing(name)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        try:
            tokens = int(read_peft_config(folder).get("num_virtual_tokens"))
        except (ValueError, TypeError):
            tokens = None
        try:
            manifest, problem = self.manifest(name), None
        except ManifestError as err:
            manifest, problem = None, str(err)
        return StoredAdapter(name, folder, manifest, size, tokens, problem or files_problem(folder))

    def manifest(self, name: str) -> Manifest | None:
        manifest = read_manifest(self._existing(name))
        if manifest is not None:
            manifest.name = name  # the folder name is the truth (a rename may crash before the rewrite)
        return manifest

    def set_guidance(self, name: str, guidance: dict[str, Any]) -> Manifest:
        """Record the guidance `name` recommends (atomically rewrites its manifest; the weights stay)."""
        folder = self._existing(name)
        manifest = read_manifest(folder)
        if manifest is None:
            raise StoreError(f"{folder} has no {MANIFEST_FILE} to record guidance in (an imported PEFT adapter?)")
        manifest.guidance = dict(guidance)
        with writing(f"record guidance in {folder / MANIFEST_FILE}"):
            atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2, default=str))
        return manifest

    def folder(self, name: str) -> Path:
        """The folder of an existing adapter (a clear error listing the known ones otherwise)."""
        return self._existing(name)

    def _existing(self, name: str) -> Path:
        folder = self.path(name)
        if not (folder / CONFIG_FILE).is_file():
            known = ", ".join(self.names()) or "none"
            raise StoreError(f"no adapter {name!r} in {self.root} (adapters: {known})")
        return folder

    def load(self, name: str, shape: PrefixShape | None = None) -> tuple[LoadedAdapter, Manifest | None]:
        folder = self._existing(name)
        return load_adapter(folder, shape), self.manifest(name)

    def save(self, name: str, flat: torch.Tensor, shape: PrefixShape, config: PrefixConfig,
             manifest: Manifest, encoder: PrefixEncoder | None = None, storage_dtype: str = "float32",
             overwrite: bool = False) -> Path:
        manifest.name = validate_name(name)
        return write_adapter_folder(self.path(name), flat, shape, config, manifest, encoder, storage_dtype,
                                    overwrite)

    def remove(self, name: str) -> None:
        folder = self._existing(name)
        trash = folder.with_name(f".{name}.rm-{time.time_ns()}")
        with writing(f"remove adapter {name!r} from the store {self.root}"):
            os.rename(folder, trash)  # invisible at once, even if the delete below is interrupted
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        folder = self._existing(old)
        target = self.path(new)
        if target.exists():
            raise StoreError(f"adapter {new!r} already exists in {self.root}; remove it first or pick another name")
        manifest = read_manifest(folder)
        with writing(f"rename adapter {old!r} in the store {self.root}"):
            os.rename(folder, target)  # one atomic step; the manifest's name below is cosmetic
            if manifest is not None:
                manifest.name = new
                atomic_write_text(target / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2, default=str))

    def import_adapter(self, source: str | Path, name: str, shape: PrefixShape, base_model: str,
                       fingerprint: str, force: bool = False, overwrite: bool = False) -> tuple[Path, str | None]:
        """Copy a PEFT prefix-tuning folder (or another prefixtune adapter) in, checked against the model.

        Returns the new folder and a warning when --force let a fingerprint mismatch through.
        """
        source = Path(source).expanduser()
        validate_name(name)
        if not overwrite and self.path(name).exists():
            raise StoreError(f"adapter {name!r} already exists in {self.root}; pass --overwrite or pick another name")
        theirs = read_manifest(source)
        warning = check_compatible(theirs, shape, fingerprint, base_model, force)
        loaded = load_adapter(source, shape)  # raises on shapes that do not fit this model
        if theirs is not None:
            manifest = theirs
            manifest.dataset = {**manifest.dataset, "imported_from": str(source)}
            if warning is None and is_legacy(manifest.fingerprint_version):  # matched this model's v1: upgrade
                manifest.base_fingerprint, manifest.fingerprint_version = fingerprint, FINGERPRINT_VERSION
        else:
            manifest = Manifest(
                name=name, base_model=base_model, base_fingerprint=fingerprint, shape=shape_dict(shape),
                prefix=loaded.config.to_dict(),
                dataset={"imported_from": str(source),
                         "peft_base_model": loaded.peft_config.get("base_model_name_or_path")},
            )
        folder = self.save(name, loaded.flat, shape, loaded.config, manifest, overwrite=overwrite)
        return folder, warning

    def import_peft(self, source: str | Path, name: str, shape: PrefixShape, base_model: str,
                    fingerprint: str, overwrite: bool = False) -> Path:
        """import_adapter without --force, returning only the folder (the older name)."""
        return self.import_adapter(source, name, shape, base_model, fingerprint, overwrite=overwrite)[0]

    def put(self, name: str, folder: str | Path) -> Path:
        """Copy a finished adapter folder in as `name`, replacing one of that name, atomically."""
        target = self.path(name)
        with writing(f"copy adapter {name!r} into the store {self.root}"), atomic_folder(target) as tmp:
            copy_tree(folder, tmp)
        return target

    def put_all(self, folders: dict[str, str | Path]) -> dict[str, Path]:
        """Publish several adapters together: every copy is staged (hidden) first, then each is swapped in.

        A failure while staging leaves the store untouched; only the final renames run one after another.
        """
        staged: dict[str, Path] = {}
        try:
            with writing(f"publish adapters {', '.join(folders)} into the store {self.root}"):
                for name, folder in folders.items():
                    self.path(name)  # a bad name fails before anything is written
                    self.root.mkdir(parents=True, exist_ok=True)
                    # Recorded before the copy: a copy that fails half-way (a full disk) is removed below too.
                    staged[name] = tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{name}.tmp-"))
                    copy_tree(folder, tmp)
                    tmp.chmod(0o777 & ~current_umask())
                return {name: swap_in(tmp, self.path(name)) for name, tmp in staged.items()}
        finally:
            for tmp in staged.values():
                shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed

    def export(self, name: str, target: str | Path, peft_only: bool = False) -> Path:
        """A PEFT-loadable copy of the adapter; our extra files ride along unless peft_only (PEFT ignores them)."""
        folder = self._existing(name)
        target = Path(target).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise StoreError(f"{target} exists and is not an empty folder; export into a new folder")
        with writing(f"export adapter {name!r} to {target}"), atomic_folder(target) as tmp:  # empty: replaced
            for item in folder.iterdir():
                if item.is_file() and (not peft_only or item.name in (CONFIG_FILE, WEIGHTS_FILE)):
                    shutil.copy2(item, tmp / item.name)
        return target


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except StoreError:
        return False
    return True


def default_store() -> Path:
    return prefixtune_home() / "adapters"
