"""One adapter folder: its manifest (`prefixtune.json`), its name rules, writing it whole, and whether it fits
a base model.

A folder holds PEFT's files (adapter_config.json + adapter_model.safetensors, loadable by `peft`), our
trainable state, and `prefixtune.json` (base model + fingerprint, data, template, hyperparameters,
metrics, versions). A folder is written under a hidden temp name (hidden names are never listed) and renamed
into place, so a crash never leaves half an adapter visible. The store (store.py) is a folder of these.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixtune.errors import UserError
from prefixtune.fileio import atomic_folder, atomic_write_text, write_failure
from prefixtune.fingerprint import FINGERPRINT_VERSION, is_legacy, legacy_fingerprint_of, warn_legacy
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.peft_io import save_adapter
from prefixtune.prefix.shapes import PrefixShape
from prefixtune.version import __version__

MANIFEST_FILE = "prefixtune.json"
SHAPE_KEYS = ("num_layers", "kv_heads", "head_dim")  # what a manifest records of PrefixShape
RESERVED_NAMES = frozenset({"none"})  # `--adapter none` means the base model
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HIDDEN_LEFTOVERS = (".*.tmp-*", ".*.old-*", ".*.rm-*")  # what an interrupted write/rm can leave behind
_STALE_S = 3600  # leftovers older than this belong to dead processes


# Defined here, below the store, because a bad name or a folder that does not fit the model is already the
# store's error; store.py uses and re-exports it.
class StoreError(UserError, ValueError):
    """A bad adapter name, a missing adapter, or an adapter that does not fit the base model."""


class ManifestError(StoreError):
    """A prefixtune.json that is not a manifest (a damaged file, not a wrong model)."""


@contextmanager
def writing(what: str) -> Iterator[None]:
    """A failed write (full disk, read-only store) as a StoreError naming what failed and the fix."""
    try:
        yield
    except FileExistsError:
        raise
    except OSError as err:
        raise StoreError(write_failure(err, what) + "; no adapter was left half-written") from err


@dataclass
class Manifest:
    """What an adapter folder says about itself."""

    name: str  # adapter name in the store
    base_model: str  # what the base model was asked as (e.g. smollm2-135m)
    base_fingerprint: str  # hash of the base model's class, config and every weight (prefixtune.fingerprint)
    shape: dict[str, Any]  # PrefixShape fields the prefix was built for
    prefix: dict[str, Any]  # PrefixConfig fields
    created: str = ""  # ISO time
    template: str | None = None  # prompt template used in training ({label} is filled in)
    label: str | None = None  # the label this adapter is conditioned on (per-label adapters)
    labels: list[str] | None = None  # label set of the training data
    fields: list[str] | None = None  # row fields a task template fills in (e.g. ["meaning_representation"])
    dataset: dict[str, Any] = field(default_factory=dict)  # source, fingerprint, rows
    hyperparams: dict[str, Any] = field(default_factory=dict)  # training settings
    metrics: dict[str, Any] = field(default_factory=dict)  # eval loss, perplexity, tokens/s ...
    versions: dict[str, str] = field(default_factory=dict)  # prefixtune/torch/transformers/peft
    fingerprint_version: int = FINGERPRINT_VERSION  # how base_fingerprint was computed (1 = legacy)
    guidance: dict[str, Any] = field(default_factory=dict)  # recommended {"scale": float, "negative": name|None}

    @classmethod
    def empty(cls) -> Manifest:
        return cls(name="", base_model="", base_fingerprint="", shape={}, prefix={})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        data = {"fingerprint_version": 1, **data}  # manifests from before the field: the legacy fingerprint
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def versions() -> dict[str, str]:
    """Installed versions from package metadata (importing peft just to ask would cost every save ~0.5 s)."""
    from importlib import metadata

    found = {"prefixtune": __version__, "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def shape_dict(shape: PrefixShape) -> dict[str, int]:
    return {k: getattr(shape, k) for k in SHAPE_KEYS}


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(
            f"invalid adapter name {name!r}: use letters, digits, '-', '_' and '.', starting with a letter "
            "or digit, at most 128 characters, no path separators or '..'"
        )
    if name.lower() in RESERVED_NAMES:
        raise StoreError(f"invalid adapter name {name!r}: it is reserved (`--adapter none` = the base model)")
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
    _remove_stale_leftovers(folder.parent)
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.versions = manifest.versions or versions()
    try:
        with writing(f"write the adapter folder {folder}"), atomic_folder(folder, overwrite) as tmp:
            save_adapter(tmp, flat, shape, config, manifest.base_model, encoder, storage_dtype)
            atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2, default=str))
    except FileExistsError as err:
        raise StoreError(str(err)) from None
    return folder


def _remove_stale_leftovers(parent: Path) -> None:
    # A SIGKILLed write cannot clean up after itself; its hidden temp folder goes on a later write.
    now = time.time()
    for pattern in _HIDDEN_LEFTOVERS:
        for path in parent.glob(pattern):
            try:
                if now - path.stat().st_mtime > _STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def read_manifest(folder: Path) -> Manifest | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object")
        return Manifest.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise ManifestError(f"{path} is not a valid prefixtune manifest ({err}); re-import or retrain the adapter")


def check_compatible(
    manifest: Manifest | None, shape: PrefixShape, fingerprint: str, model_name: str, force: bool = False
) -> str | None:
    """Refuse an adapter trained on another base model; returns a warning when --force overrides."""
    if manifest is None:
        return None  # foreign (PEFT) adapters carry no fingerprint; their shapes are checked on load
    wanted = shape_dict(shape)
    same_shape = {k: manifest.shape.get(k) for k in SHAPE_KEYS} == wanted
    if is_legacy(manifest.fingerprint_version):
        legacy = legacy_fingerprint_of(fingerprint)
        if legacy is not None and manifest.base_fingerprint == legacy and same_shape:
            warn_legacy(manifest.name)
            return None
    if manifest.base_fingerprint == fingerprint and same_shape:
        return None
    problem = (
        f"adapter {manifest.name!r} was trained on base model {manifest.base_model!r} (fingerprint "
        f"{manifest.base_fingerprint}), but the loaded base model is {model_name!r} (fingerprint {fingerprint})"
    )
    if not same_shape:
        raise StoreError(
            f"{problem}, and the prefix shapes differ (adapter {manifest.shape} vs model {wanted}). "
            f"Load it with --model {manifest.base_model}; --force cannot help when shapes differ."
        )
    if not force:
        raise StoreError(
            f"{problem}. Load it with --model {manifest.base_model}, or pass --force (the shapes match, but "
            "the output is unlikely to be what the adapter learned)."
        )
    return f"warning: {problem}; loading anyway (--force)"

