"""Checkpoints: trainable state, optimizer, scheduler, RNG and data position, written atomically.

No pickle: `state.pt` holds only tensors and plain containers (read back with `weights_only=True`); the RNG
states are stored as lists and tensors, the progress as JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixtune.errors import UserError
from prefixtune.fileio import atomic_folder, write_failure

CHECKPOINT_DIR = "checkpoint"


@dataclass
class Progress:
    """Where a run is: enough to continue with the same step count and the same data order."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    micro_batch_size: int = 0  # current micro-batch (it can shrink after an OOM)
    best_eval: float | None = None  # best validation loss so far
    evals_without_gain: int = 0  # for early stopping
    tokens: int = 0  # real tokens trained on
    train_seconds: float = 0.0  # time spent in training steps (resumes add up)
    history: list[dict[str, Any]] = field(default_factory=list)  # logged records so far


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                               has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says what is kept and what to do."""


def save_checkpoint(run_dir: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    progress: Progress) -> Path:
    """Write run_dir/checkpoint as a whole: a temp folder renamed over the old one (kept if this fails)."""
    target = run_dir / CHECKPOINT_DIR
    try:
        with atomic_folder(target) as tmp:
            torch.save(
                {
                    "trainable": trainable,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                },
                tmp / "state.pt",
            )
            (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=1))
    except OSError as err:
        kept = _saved_step(target)
        raise CheckpointError(
            write_failure(err, f"write a checkpoint into {run_dir}") + "; "
            + (f"the last good checkpoint (step {kept}) is kept: then rerun with --resume"
               if kept is not None else "no checkpoint was kept: then rerun")
        ) from None
    return target


def _saved_step(target: Path) -> int | None:
    try:
        return int(json.loads((target / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(run_dir: Path, load_trainable, optimizer, scheduler) -> Progress:
    """Restore a checkpoint: `load_trainable(state_dict)` takes the method's tensors back."""
    target = run_dir / CHECKPOINT_DIR
    if not (target / "state.pt").is_file():
        raise CheckpointError(
            f"--resume: no checkpoint in {target}; start without --resume (or point --out at the run to resume)"
        )
    try:
        state = torch.load(target / "state.pt", map_location="cpu", weights_only=True)
        progress = Progress(**json.loads((target / "progress.json").read_text()))
    except Exception as err:  # noqa: BLE001 - torch/json raise many types for a damaged file
        first = (str(err).strip().splitlines() or [""])[0][:200]  # torch's refusal runs to a page
        raise CheckpointError(f"--resume: the checkpoint in {target} is unreadable ({type(err).__name__}: "
                              f"{first}); start again with --overwrite") from None
    load_trainable(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return progress


def recover_checkpoint(run_dir: Path) -> None:
    """Undo a swap cut short by a kill: atomic_folder moves the old checkpoint aside (`.checkpoint.old-*`)
    only after the new one (`.checkpoint.tmp-*`) is complete; the candidate with the highest readable step
    is put back (state.pt is written before progress.json, so a readable progress.json means a whole one)."""
    if has_checkpoint(run_dir) or not run_dir.is_dir():
        return
    if not any(run_dir.glob(f".{CHECKPOINT_DIR}.old-*")):
        return  # no swap was cut short
    candidates = [(step, p) for p in run_dir.glob(f".{CHECKPOINT_DIR}.*-*")
                  if (step := _saved_step(p)) is not None and (p / "state.pt").is_file()]
    if candidates:
        max(candidates, key=lambda c: c[0])[1].rename(run_dir / CHECKPOINT_DIR)


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of run_dir's checkpoint, or None when it has none."""
    return _saved_step(run_dir / CHECKPOINT_DIR) if has_checkpoint(run_dir) else None


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / "state.pt").is_file()
