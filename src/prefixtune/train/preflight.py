"""Everything a run needs, checked before the first step: settings, names, output folder, store.

A run is all-or-nothing: a setting that would fail at the first save (a storage dtype, an adapter name, an
unwritable store) fails here instead, before the model loads; a non-empty `--out` is refused unless the run
continues it (`--resume`) or replaces it (`--overwrite`), so `best/` and `last/` are always this run's.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from prefixtune.train.config import ConfigError

if TYPE_CHECKING:
    from prefixtune.train.config import TrainConfig

RUN_FILE = "run.json"  # the run's settings, written before the first step; marks a folder as a run
SHARDS_DIR = "shards"  # a sharded run's adapters, one run folder each (train/sharded.py)
STORAGE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                   "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
METHODS = ("prefix", "lora")
DISTRIBUTED = ("auto", "shard", "ddp")
SCHEDULES = ("cosine", "linear", "constant")
# Settings that may differ between a run and its --resume without changing what it computes.
# (`distributed`: both ways give the one-process result; check_out refuses the switch between layouts.)
_RESUME_FREE = frozenset({"resume", "overwrite", "progress", "store", "save_every", "device", "distributed"})


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value, name: str) -> None:
    _need(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")


def check_settings(cfg: TrainConfig) -> None:
    """Value checks for every field (no I/O). Normalises storage_dtype aliases (fp16 -> float16)."""
    from prefixtune.prefix.encoder import INIT_CHOICES
    from prefixtune.store import StoreError, validate_name

    key = str(cfg.storage_dtype).strip().lower().removeprefix("torch.")
    _need(key in STORAGE_ALIASES, f"--storage-dtype {cfg.storage_dtype!r}: use float32, bfloat16 or float16 "
                                  "(fp32/bf16/fp16 are accepted too)")
    cfg.storage_dtype = STORAGE_ALIASES[key]
    _need(cfg.method in METHODS, f"--method {cfg.method!r}: use one of {', '.join(METHODS)}")
    _need(cfg.distributed in DISTRIBUTED,
          f"--distributed {cfg.distributed!r}: use one of {', '.join(DISTRIBUTED)} (docs/DISTRIBUTED.md)")
    _need(cfg.schedule in SCHEDULES, f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    for name in ("lr", "weight_decay", "warmup_ratio", "grad_clip", "epochs", "lora_dropout"):
        _finite(getattr(cfg, name), f"--{name.replace('_', '-')}")
    _need(0 <= cfg.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    _need(cfg.grad_clip > 0, f"--grad-clip must be > 0, got {cfg.grad_clip}")
    _need(cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}")
    _need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    for name in ("num_virtual_tokens", "max_length"):
        _need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1,
              f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(cfg, name)!r}")
    _need(cfg.max_length >= 2, f"--max-length must be >= 2 (a prompt token and a scored one), got {cfg.max_length}")
    _need(cfg.num_virtual_tokens <= 4096, f"--num-virtual-tokens {cfg.num_virtual_tokens} is absurd; use <= 4096")
    for name in ("eval_every", "eval_examples", "early_stopping", "save_every", "loss_check_steps"):
        _need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0,
              f"--{name.replace('_', '-')} must be a whole number >= 0, got {getattr(cfg, name)!r}")
    if cfg.max_examples is not None:
        _need(cfg.max_examples >= 1, f"--max-examples must be >= 1, got {cfg.max_examples}")
    if cfg.encoder_hidden_size is not None:
        _need(cfg.encoder_hidden_size >= 1, f"--encoder-hidden-size must be >= 1, got {cfg.encoder_hidden_size}")
    _need(cfg.init in INIT_CHOICES, f"--init {cfg.init!r}: use one of {', '.join(INIT_CHOICES)}")
    _need(cfg.init != "text" or bool(cfg.init_text),
          "--init text needs --init-text (the text whose keys/values start the prefix)")
    _need(cfg.lora_r >= 1, f"--lora-r must be >= 1, got {cfg.lora_r}")
    _need(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.method == "lora":
        _need(not cfg.per_label, "--per-label is prefix-only: LoRA trains one adapter with the label in the prompt")
        _need(cfg.init_from is None, "--init-from continues a prefix adapter; it does not apply to --method lora")
        _need(not cfg.store, "--store holds prefix adapters; a LoRA run keeps its adapter in OUT (drop --store)")
    _need(not (cfg.resume and cfg.overwrite), "--resume continues OUT and --overwrite replaces it: pick one")
    try:
        validate_name(cfg.name)
    except StoreError as err:
        raise ConfigError(f"--name: {err}") from None
    if cfg.device is not None or cfg.dtype is not None:
        from prefixtune.models import resolve_device_dtype

        try:
            resolve_device_dtype(cfg.device, cfg.dtype)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _writable(folder: Path, what: str, fix: str) -> None:
    """Prove a file can be written in `folder`, or in its nearest existing parent when it does not exist yet
    (nothing is created: a run that fails its checks leaves no trace)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {folder} is not writable ({err.strerror or err}); {fix}") from None


def check_paths(cfg: TrainConfig) -> None:
    """Paths besides OUT: --init-from must be an adapter folder, --store must be writable."""
    if cfg.init_from is not None:
        folder = Path(cfg.init_from).expanduser()
        _need((folder / "adapter_config.json").is_file(),
              f"--init-from {folder}: not an adapter folder (no adapter_config.json)")
    if cfg.store:
        _writable(Path(cfg.store).expanduser(), "--store", "pick another --store or fix its permissions")


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def check_out(cfg: TrainConfig, sharded: bool = False) -> bool:
    """Whether OUT may be used as asked, without changing it; returns True when a checkpoint will be resumed.

    Fresh run: OUT must be empty (or `--overwrite`). `--resume`: OUT must be a run folder of the same kind
    (one pass, or `sharded` over processes); without a checkpoint yet (the run was killed before its first
    one) the run starts again from step 0.
    """
    from prefixtune.train.checkpoint import has_checkpoint, recover_checkpoint

    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; point --out at a folder")
    if cfg.resume:
        recover_checkpoint(out)
        # An empty OUT is a run killed before it started: --resume then simply starts it.
        _need(_is_empty(out) or (out / RUN_FILE).is_file() or has_checkpoint(out),
              f"--resume: {out} holds files but no run to continue; start without --resume or pick another --out")
        if sharded:
            _need(not has_checkpoint(out), f"--resume: {out} holds a run that trained its adapters together "
                                           "(OUT/checkpoint): continue it with --distributed ddp, or on one process")
        else:
            _need(not (out / SHARDS_DIR).is_dir(), f"--resume: {out} holds a run whose adapters trained apart "
                                                   f"(OUT/{SHARDS_DIR}): continue it with --distributed shard")
    elif not _is_empty(out):
        _need(cfg.overwrite, f"--out {out} already holds files (a previous run?); pass --resume to continue "
                             "it, --overwrite to replace it, or choose another --out")
    _writable(out, "--out", "pick another --out or fix its permissions")
    return cfg.resume and has_checkpoint(out)


def claim_out(cfg: TrainConfig, resume: bool, say=print) -> None:
    """Make OUT this run's (after every check passed): clear what a fresh run must not inherit, record it."""
    from prefixtune.prefix.peft_io import atomic_write_text

    out = Path(cfg.out).expanduser()
    if resume:
        _warn_changed_settings(cfg, out, say)
        return
    if cfg.resume:
        say(f"note: {out} has no checkpoint yet (the run stopped before its first one): starting at step 0")
    elif out.exists() and any(out.iterdir()):
        say(f"--overwrite: removing the previous run in {out}")
    if out.exists():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps(cfg.to_dict(), indent=1, default=str))


def _clear(out: Path) -> None:
    for item in out.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def _warn_changed_settings(cfg: TrainConfig, out: Path, say) -> None:
    try:
        before = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return
    now = cfg.to_dict()
    changed = sorted(k for k in now if k not in _RESUME_FREE and k in before and before[k] != now[k])
    if changed:
        say(f"warning: --resume with settings that differ from the run's ({', '.join(changed)}); "
            "the result will not match an uninterrupted run")


def resume_command(cfg: TrainConfig) -> str:
    """What to type to continue an interrupted run."""
    return f"prefixtune train --config {Path(cfg.out) / RUN_FILE} --resume"

