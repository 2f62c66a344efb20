"""Checkpoints: trainable state, optimizer, scheduler, RNG and data position, written atomically."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixtune.prefix.peft_io import atomic_folder

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, encoders, optimizer, scheduler, progress: Progress) -> Path:
    """Write run_dir/checkpoint as a whole: a temp folder renamed over the old one."""
    target = run_dir / CHECKPOINT_DIR
    with atomic_folder(target) as tmp:
        torch.save(
            {
                "encoders": encoders.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            },
            tmp / "state.pt",
        )
        (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=1))
    return target


def load_checkpoint(run_dir: Path, encoders, optimizer, scheduler) -> Progress:
    target = run_dir / CHECKPOINT_DIR
    if not (target / "state.pt").is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint in {target}; start without --resume (or point --out at the run to resume)"
        )
    state = torch.load(target / "state.pt", map_location="cpu", weights_only=False)
    encoders.load_state_dict(state["encoders"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Progress(**json.loads((target / "progress.json").read_text()))


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / "state.pt").is_file()
