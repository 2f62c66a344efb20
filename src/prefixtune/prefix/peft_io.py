"""PEFT's prefix-tuning file format, both ways, plus our trainable-state file.

PEFT keeps only the folded prefix (`prompt_embeddings`, (P, 2L*kv_heads*head_dim)); the MLP is thrown away.
We write the same two files so `peft.PeftModel.from_pretrained` loads our adapters, and keep the
embedding + MLP beside them (`prefix_trainable.safetensors`) so training can resume through the MLP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prefixtune.errors import UserError
from prefixtune.fileio import atomic_folder, atomic_write, atomic_write_text, swap_in  # noqa: F401 - re-exported
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.shapes import PrefixShape, ShapeMismatchError, check_size

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
TRAINABLE_FILE = "prefix_trainable.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class AdapterFormatError(UserError, ValueError):
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


def files_problem(folder: str | Path) -> str | None:
    """Why the adapter files in `folder` cannot load, checked cheaply (no tensor is read), or None.

    Reads the config and each safetensors header: safetensors refuses a header whose tensors run past the end
    of the file, so a truncated or overwritten weights file shows here without loading it.
    """
    from safetensors import safe_open

    folder = Path(folder)
    try:
        read_peft_config(folder)
    except AdapterFormatError as err:
        return str(err)
    if not (folder / WEIGHTS_FILE).is_file():
        return None if (folder / LEGACY_WEIGHTS_FILE).is_file() else f"{folder} has no {WEIGHTS_FILE}"
    for name in (WEIGHTS_FILE, TRAINABLE_FILE):
        path = folder / name
        if name == TRAINABLE_FILE and not path.is_file():
            continue
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            return f"{path} is unreadable ({type(err).__name__}: {err}); re-export or retrain the adapter"
    return None


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
        name = WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else LEGACY_WEIGHTS_FILE
        raise AdapterFormatError(f"{folder}/{name}: the weights file is unreadable ({type(err).__name__}: {err}); "
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
