"""PEFT's prefix-tuning file format, both ways, plus our trainable-state file.

PEFT keeps only the folded prefix (`prompt_embeddings`, (P, 2L*kv_heads*head_dim)); the MLP is thrown away.
We write the same two files so `peft.PeftModel.from_pretrained` loads our adapters, and keep the
embedding + MLP beside them (`prefix_trainable.safetensors`) so training can resume through the MLP.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.shapes import PrefixShape, ShapeMismatchError, check_size

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
TRAINABLE_FILE = "prefix_trainable.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class AdapterFormatError(ValueError):
    """An adapter folder that is not a readable prefix-tuning adapter."""


@dataclass
class LoadedAdapter:
    flat: torch.Tensor  # (P, 2L*kv_heads*head_dim), PEFT's prompt_embeddings
    config: PrefixConfig
    peft_config: dict[str, Any]
    trainable: dict[str, torch.Tensor] | None  # embedding + MLP when we saved them

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.flat.shape[0])


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int | None:
    """The process umask without changing it (Linux: /proc/self/status), or None where that is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _probe_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before a server or trainer starts its
    # threads, so no other thread can create a file while the mask is briefly 0.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _read_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _probe_umask()


def _umask() -> int:
    """Never sets the umask at runtime: another thread may be creating files at that moment."""
    mask = _read_umask()
    return _IMPORT_UMASK if mask is None else mask


def swap_in(tmp: Path, target: Path, overwrite: bool = True) -> Path:
    """Rename the finished folder `tmp` to `target`; an old `target` is moved aside first and put back if the
    rename fails. Between the two renames the name is briefly absent, never half-written."""
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} appeared while writing; choose another name or pass --overwrite")
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `target`; when the block succeeds it becomes `target`, whole (swap_in).

    On failure the temp folder goes and `target` stays.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp is owner-only; the result should read like any other folder
    try:
        yield tmp
        swap_in(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def peft_config_dict(shape: PrefixShape, config: PrefixConfig, base_model: str) -> dict[str, Any]:
    """PEFT's PrefixTuningConfig(...).to_dict(), written out so saving never imports peft (~0.5 s a run);
    tests/prefix/test_peft_io.py checks it equals PEFT's own output and that PEFT loads the folder."""
    from importlib import metadata

    try:
        peft_version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        peft_version = None
    return {
        "task_type": "CAUSAL_LM", "peft_type": "PREFIX_TUNING", "auto_mapping": None, "peft_version": peft_version,
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens, "token_dim": shape.token_dim,
        "num_transformer_submodules": None, "num_attention_heads": shape.kv_heads, "num_layers": shape.num_layers,
        "modules_to_save": None, "init_weights": None,
        "encoder_hidden_size": config.encoder_hidden_size or shape.hidden_size,
        "prefix_projection": config.prefix_projection,
    }


def save_adapter(
    folder: str | Path,
    flat: torch.Tensor,
    shape: PrefixShape,
    config: PrefixConfig,
    base_model: str,
    encoder: PrefixEncoder | None = None,
    storage_dtype: str = "float32",
) -> None:
    """Write PEFT's two files (and our trainable state when given) atomically into `folder`."""
    folder = Path(folder)
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if tuple(flat.shape) != (config.num_virtual_tokens, shape.flat_dim):
        raise ShapeMismatchError(
            f"prefix has shape {tuple(flat.shape)}, expected {(config.num_virtual_tokens, shape.flat_dim)}"
        )
    cfg = peft_config_dict(shape, config, base_model)
    tensor = flat.detach().to("cpu", STORAGE_DTYPES[storage_dtype]).contiguous()
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file({"prompt_embeddings": tensor}, tmp))
    if encoder is not None and encoder.projection:  # without an MLP the PEFT file already is the state
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        atomic_write(folder / TRAINABLE_FILE, lambda tmp: save_file(state, tmp))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True, default=str))


def read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder} has no {CONFIG_FILE}; is it an adapter folder?")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise AdapterFormatError(
            f"{path} describes a {cfg.get('peft_type')} adapter; prefixtune loads PREFIX_TUNING adapters "
            "(LoRA adapters are for `prefixtune compare`, not the prefix engine)."
        )
    return cfg


_MAX_CONFIG_INT = 1 << 20  # no real prefix has a million virtual tokens, layers or widths


def _config_int(folder: Path, cfg: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """An integer field of adapter_config.json, refused clearly when absent-but-required, non-integer or absurd."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_CONFIG_INT:
        raise AdapterFormatError(f"{folder}/{CONFIG_FILE}: {key}={value!r} is not a sensible size (a whole number "
                                 f"from 1 to {_MAX_CONFIG_INT}); re-export the adapter")
    return value


def load_adapter(folder: str | Path, shape: PrefixShape | None = None) -> LoadedAdapter:
    """Read a folder written by prefixtune or by `peft`; with `shape`, check it fits that model."""
    folder = Path(folder)
    cfg = read_peft_config(folder)
    try:
        if (folder / WEIGHTS_FILE).is_file():
            weights = load_file(str(folder / WEIGHTS_FILE))
        elif (folder / LEGACY_WEIGHTS_FILE).is_file():
            weights = torch.load(folder / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        else:
            raise AdapterFormatError(f"{folder} has no {WEIGHTS_FILE}")
    except AdapterFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors/pickle errors have no common base class
        raise AdapterFormatError(f"{folder}: the weights file is unreadable ({type(err).__name__}: {err}); "
                                 "re-export or retrain the adapter") from err
    key = next((k for k in weights if k.endswith("prompt_embeddings")), None)
    if key is None:
        raise AdapterFormatError(f"{folder}/{WEIGHTS_FILE} holds no prompt_embeddings ({', '.join(weights)})")
    flat = weights[key]
    if flat.dim() != 2 or not flat.is_floating_point():
        raise AdapterFormatError(f"{folder}: prompt_embeddings must be a 2-D float tensor (virtual tokens x width), "
                                 f"got {flat.dtype} of shape {tuple(flat.shape)}; re-export or retrain the adapter")
    flat = flat.float()
    if not torch.isfinite(flat).all():
        raise AdapterFormatError(f"{folder}: prompt_embeddings hold NaN or inf values (a diverged run?); retrain it")
    p = _config_int(folder, cfg, "num_virtual_tokens", default=flat.shape[0])
    if flat.shape[0] != p:
        raise AdapterFormatError(f"{folder}: config says {p} virtual tokens, weights have {flat.shape[0]}")
    if shape is not None:
        check_size("num_layers", _config_int(folder, cfg, "num_layers"), shape.num_layers, shape)
        check_size("token_dim", _config_int(folder, cfg, "token_dim"), shape.token_dim, shape)
        check_size("num_attention_heads (kv heads)", _config_int(folder, cfg, "num_attention_heads"), shape.kv_heads,
                   shape)
        check_size("prompt_embeddings width", flat.shape[1], shape.flat_dim, shape)
    config = PrefixConfig(
        num_virtual_tokens=p,
        prefix_projection=bool(cfg.get("prefix_projection", False)),
        encoder_hidden_size=_config_int(folder, cfg, "encoder_hidden_size"),
    )
    try:
        trainable = load_file(str(folder / TRAINABLE_FILE)) if (folder / TRAINABLE_FILE).is_file() else None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterFormatError(f"{folder}/{TRAINABLE_FILE} is unreadable ({type(err).__name__}: {err}); delete "
                                 "it to use the folded prefix alone, or retrain the adapter") from err
    return LoadedAdapter(flat, config, cfg, trainable)
