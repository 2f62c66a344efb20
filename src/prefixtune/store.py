"""The adapter library: one self-describing folder per adapter beside one frozen base model.

A folder holds PEFT's files (adapter_config.json + adapter_model.safetensors, loadable by `peft`), our
trainable state, and `prefixtune.json` (base model + fingerprint, data, template, hyperparameters,
metrics, versions). Every write is atomic: a folder is built under a hidden temp name (hidden names are
never listed) and renamed into place, so a crash never leaves half an adapter visible.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixtune.errors import UserError
from prefixtune.fingerprint import (  # noqa: F401 - LegacyFingerprintWarning is part of the store's API
    FINGERPRINT_VERSION,
    LegacyFingerprintWarning,
    is_legacy,
    legacy_fingerprint_of,
    warn_legacy,
)
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.fileio import atomic_folder, atomic_write_text, copy_tree, current_umask, swap_in, write_failure
from prefixtune.paths import prefixtune_home
from prefixtune.prefix.peft_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoadedAdapter,
    files_problem,
    load_adapter,
    read_peft_config,
    save_adapter,
)
from prefixtune.prefix.shapes import PrefixShape
from prefixtune.version import __version__

MANIFEST_FILE = "prefixtune.json"
SHAPE_KEYS = ("num_layers", "kv_heads", "head_dim")  # what a manifest records of PrefixShape
RESERVED_NAMES = frozenset({"none"})  # `--adapter none` means the base model
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HIDDEN_LEFTOVERS = (".*.tmp-*", ".*.old-*", ".*.rm-*")  # what an interrupted write/rm can leave behind
_STALE_S = 3600  # leftovers older than this belong to dead processes


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
