"""The adapter library: one self-describing folder per adapter beside one frozen base model.

A folder holds PEFT's files (adapter_config.json + adapter_model.safetensors, loadable by `peft`), our
trainable state, and `prefixtune.json` (base model + fingerprint, data, template, hyperparameters,
metrics, versions). Folders appear atomically: written under a hidden temp name, then renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.peft_io import (
    CONFIG_FILE,
    LoadedAdapter,
    atomic_write_text,
    load_adapter,
    save_adapter,
)
from prefixtune.prefix.shapes import PrefixShape

MANIFEST_FILE = "prefixtune.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(ValueError):
    """A bad adapter name, a missing adapter, or an adapter that does not fit the base model."""


@dataclass
class Manifest:
    """What an adapter folder says about itself."""

    name: str  # adapter name in the store
    base_model: str  # what the base model was asked as (e.g. smollm2-135m)
    base_fingerprint: str  # hash of the base model's config + a few weights
    shape: dict[str, Any]  # PrefixShape fields the prefix was built for
    prefix: dict[str, Any]  # PrefixConfig fields
    created: str = ""  # ISO time
    template: str | None = None  # prompt template used in training ({label} is filled in)
    label: str | None = None  # the label this adapter is conditioned on (per-label adapters)
    labels: list[str] | None = None  # label set of the training data
    dataset: dict[str, Any] = field(default_factory=dict)  # source, fingerprint, rows
    hyperparams: dict[str, Any] = field(default_factory=dict)  # training settings
    metrics: dict[str, Any] = field(default_factory=dict)  # eval loss, perplexity, tokens/s ...
    versions: dict[str, str] = field(default_factory=dict)  # prefixtune/torch/transformers/peft

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def versions() -> dict[str, str]:
    import peft
    import transformers

    import prefixtune

    return {
        "prefixtune": prefixtune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(
            f"invalid adapter name {name!r}: use letters, digits, '-', '_' and '.', starting with a letter "
            "or digit, no path separators or '..'"
        )
    return name


def write_adapter_folder(
    folder: str | Path,
    flat: torch.Tensor,
    shape: PrefixShape,
    config: PrefixConfig,
    manifest: Manifest,
    encoder: PrefixEncoder | None = None,
    storage_dtype: str = "float32",
    overwrite: bool = True,
) -> Path:
    """Write a complete adapter folder; it appears whole or not at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not overwrite:
        raise StoreError(f"{folder} exists; pass --overwrite or choose another name")
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.versions = manifest.versions or versions()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        save_adapter(tmp, flat, shape, config, manifest.base_model, encoder, storage_dtype)
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2, default=str))
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename tmp onto target; an old target is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    return Manifest.from_dict(json.loads(path.read_text()))


def check_compatible(
    manifest: Manifest | None, shape: PrefixShape, fingerprint: str, model_name: str, force: bool = False
) -> str | None:
    """Refuse an adapter trained on another base model; returns a warning when --force overrides."""
    if manifest is None:
        return None  # foreign (PEFT) adapters carry no fingerprint; their shapes were checked on load
    same_shape = manifest.shape == {k: getattr(shape, k) for k in manifest.shape}
    if manifest.base_fingerprint == fingerprint and same_shape:
        return None
    problem = (
        f"adapter {manifest.name!r} was trained on {manifest.base_model} (fingerprint "
        f"{manifest.base_fingerprint}), but the loaded base model is {model_name} (fingerprint {fingerprint})"
    )
    if not same_shape:
        raise StoreError(f"{problem}, and the shapes differ ({manifest.shape} vs {shape.describe()}).")
    if not force:
        raise StoreError(f"{problem}. Load it on its own base model, or pass --force (the shapes match).")
    return f"warning: {problem}; loading anyway (--force)"


@dataclass
class StoredAdapter:
    name: str
    path: Path
    manifest: Manifest | None
    size_bytes: int


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
            if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
        )

    def list(self) -> list[StoredAdapter]:
        return [self.info(n) for n in self.names()]

    def info(self, name: str) -> StoredAdapter:
        folder = self._existing(name)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        return StoredAdapter(name, folder, read_manifest(folder), size)

    def _existing(self, name: str) -> Path:
        folder = self.path(name)
        if not (folder / CONFIG_FILE).is_file():
            known = ", ".join(self.names()) or "none"
            raise StoreError(f"no adapter {name!r} in {self.root} (adapters: {known})")
        return folder

    def load(self, name: str, shape: PrefixShape | None = None) -> tuple[LoadedAdapter, Manifest | None]:
        folder = self._existing(name)
        return load_adapter(folder, shape), read_manifest(folder)

    def save(self, name: str, flat: torch.Tensor, shape: PrefixShape, config: PrefixConfig,
             manifest: Manifest, encoder: PrefixEncoder | None = None, storage_dtype: str = "float32",
             overwrite: bool = False) -> Path:
        manifest.name = validate_name(name)
        return write_adapter_folder(self.path(name), flat, shape, config, manifest, encoder, storage_dtype,
                                    overwrite)

    def remove(self, name: str) -> None:
        folder = self._existing(name)
        trash = folder.with_name(f".{name}.rm-{time.time_ns()}")
        os.rename(folder, trash)  # invisible at once, even if the delete below is interrupted
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        folder = self._existing(old)
        target = self.path(new)
        if target.exists():
            raise StoreError(f"adapter {new!r} already exists")
        manifest = read_manifest(folder)
        os.rename(folder, target)
        if manifest is not None:
            manifest.name = new
            atomic_write_text(target / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2, default=str))

    def import_peft(self, source: str | Path, name: str, shape: PrefixShape, base_model: str,
                    fingerprint: str, overwrite: bool = False) -> Path:
        """Copy a PEFT prefix-tuning folder in, checking its shapes against the base model."""
        loaded = load_adapter(source, shape)
        manifest = read_manifest(Path(source)) or Manifest(
            name=name, base_model=base_model, base_fingerprint=fingerprint,
            shape={k: getattr(shape, k) for k in ("num_layers", "kv_heads", "head_dim")},
            prefix=loaded.config.to_dict(), dataset={"imported_from": str(source)},
        )
        return self.save(name, loaded.flat, shape, loaded.config, manifest, overwrite=overwrite)

    def export(self, name: str, target: str | Path) -> Path:
        """A PEFT-loadable copy of the adapter (our extra files ride along; PEFT ignores them)."""
        folder = self._existing(name)
        target = Path(target)
        if target.exists() and any(target.iterdir()):
            raise StoreError(f"{target} exists and is not empty")
        tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        shutil.copytree(folder, tmp / "a")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmdir()
        shutil.move(str(tmp / "a"), target)
        shutil.rmtree(tmp, ignore_errors=True)
        return target


def default_store() -> Path:
    from prefixtune.models import prefixtune_home

    return prefixtune_home() / "adapters"
