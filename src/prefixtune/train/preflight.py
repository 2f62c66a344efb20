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

from prefixtune.train.config import ConfigError, TrainConfig

RUN_FILE = "run.json"  # the run's settings, written before the first step; marks a folder as a run
SHARDS_DIR = "shards"  # a sharded run's adapters, one run folder each (train/sharded.py)
# Settings that may differ between a run and its --resume without changing what it computes.
# (`distributed`: both ways give the one-process result; check_out refuses the switch between layouts.)
_RESUME_FREE = frozenset({"resume", "overwrite", "progress", "store", "save_every", "device", "distributed"})


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
    from prefixtune.fileio import atomic_write_text

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

