"""Base-model identity: a fingerprint of the class, the architecture config and every weight.

Adapters record it and are refused on another base model. Version 1 (kept only to recognise old adapters)
hashed 64 values of three tensors and was blind to every transformer block.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from prefixtune.fileio import atomic_write_text
from prefixtune.paths import prefixtune_home


# Keys that change with how a model was loaded rather than what its weights compute. `architectures` is
# dropped because a GGUF load leaves it None while save_pretrained fills it in; the loaded class name is
# hashed instead, which carries the same information for both.
_VOLATILE_KEYS = frozenset({
    "torch_dtype", "dtype", "transformers_version", "architectures", "quantization_config",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})


def _stable_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable_config(v) for k, v in obj.items() if k not in _VOLATILE_KEYS and not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_stable_config(v) for v in obj]
    return obj


FINGERPRINT_VERSION = 2  # 1: config + 64 values of 3 tensors (blind to every transformer block); 2: every weight
_LEGACY_OF: dict[str, str] = {}  # fingerprint -> the version-1 fingerprint of the same loaded model
_CHUNK = 1 << 24  # elements hashed at a time: bounds the extra memory of the bf16 copy


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the frozen base


def _config_digest(model: Any) -> Any:
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    return digest


def model_fingerprint(model: Any) -> str:
    """16-hex sha256 of a base model's class, architecture config and EVERY weight, independent of dtype and
    source.

    Each parameter (sorted by name, tied weights once) is hashed with its name and shape as bfloat16 bytes:
    fp32->bf16 is exactly the cast a bf16 load performs, so fp32 and bf16 loads of the same weights hash
    identically (fp16 loads round twice and may differ). Changing any weight of any layer changes it.
    """
    model = _unwrap(model)
    digest = _config_digest(model)
    with torch.no_grad():
        for name, tensor in sorted(model.named_parameters(), key=lambda item: item[0]):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            flat = tensor.detach().reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                part = flat[start:start + _CHUNK].to("cpu", torch.bfloat16).view(torch.int16)
                digest.update(part.numpy().tobytes())
    return digest.hexdigest()[:16]


def legacy_fingerprint(model: Any) -> str:
    """Version 1 (prefixtune <= 0.1 manifests): config + 64 bf16-rounded values of 3 tensors. Kept only to
    recognise adapters written with it; it cannot tell two models apart that differ inside their blocks."""
    model = _unwrap(model)
    digest = _config_digest(model)
    params = dict(model.named_parameters())
    names = sorted(params)
    samples = [("input_embeddings", model.get_input_embeddings().weight)]
    samples += [(names[0], params[names[0]]), (names[-1], params[names[-1]])]
    for label, tensor in samples:
        values = tensor.detach().reshape(-1)[:64].to("cpu", torch.float32).to(torch.bfloat16).float()
        digest.update(f"{label}{tuple(tensor.shape)}".encode())
        digest.update(json.dumps(values.tolist()).encode())
    return digest.hexdigest()[:16]


def remember_legacy(fingerprint: str, legacy: str) -> None:
    _LEGACY_OF[fingerprint] = legacy


def legacy_fingerprint_of(fingerprint: str) -> str | None:
    """The version-1 fingerprint of a model loaded in this process (None if it was not loaded here)."""
    return _LEGACY_OF.get(fingerprint)


def _weight_files(location: str, gguf_file: str | None) -> list[Path] | None:
    """The local files a model's weights come from (None for a hub id: no stable file stat to key on)."""
    folder = Path(location)
    if gguf_file:
        return [folder / gguf_file]
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    return files or None


def cached_fingerprints(model: Any, location: str, gguf_file: str | None, dtype: torch.dtype) -> tuple[str, str]:
    """(fingerprint, legacy fingerprint), cached under $PREFIXTUNE_HOME/fingerprints by the weight files' stat
    (path, size, mtime) and dtype: hashing every weight costs ~1 s per 100M parameters, a cache hit ~0."""
    files = _weight_files(location, gguf_file)
    path = None
    if files is not None:
        try:
            stat = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        except OSError:
            stat = None
        if stat is not None:
            key = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, str(dtype), stat]).encode()).hexdigest()[:32]
            path = prefixtune_home() / "fingerprints" / f"{key}.json"
            try:
                hit = json.loads(path.read_text())
                return str(hit["fingerprint"]), str(hit["legacy"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
    found = model_fingerprint(model), legacy_fingerprint(model)
    if path is not None:
        try:
            atomic_write_text(path, json.dumps({"fingerprint": found[0], "legacy": found[1]}))
        except OSError:  # a read-only home only costs the next load the hashing again
            pass
    return found


class LegacyFingerprintWarning(UserWarning):
    """An adapter recorded its base model with the legacy (version 1) fingerprint."""


_WARNED_LEGACY: set[str] = set()


def is_legacy(version: int | None) -> bool:
    return int(version or 1) < FINGERPRINT_VERSION


def warn_legacy(adapter: str) -> None:
    """Once per adapter and process: the old fingerprint matched, but it only saw 3 tensors of the model."""
    if adapter in _WARNED_LEGACY:
        return
    _WARNED_LEGACY.add(adapter)
    warnings.warn(f"adapter {adapter!r} records its base model with the legacy fingerprint (a few values of 3 "
                  "tensors, blind to the transformer blocks); loaded, but re-save it (retrain, or `prefixtune "
                  "adapters import` it again) to record the full fingerprint", LegacyFingerprintWarning, stacklevel=4)
