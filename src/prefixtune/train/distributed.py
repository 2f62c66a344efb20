"""Several processes (`accelerate launch`): which way a run splits over the ranks, and each rank's device.

- shard: a per-label family's adapters are dealt out to the ranks and each adapter trains alone, exactly as
  a one-process run of its label alone (`--labels LABEL`): no gradient crosses processes. Rank 0 merges the
  results into OUT and the store (train/sharded.py).
- ddp: every rank holds every adapter; each optimizer step's `--batch-size` rows are split over the ranks and
  the gradients summed, so the result equals a one-process run of the same command (train/gradients.py).
See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

from prefixtune.train.config import ConfigError, TrainConfig
from prefixtune.train.label_words import PLACEHOLDER

SINGLE, DDP, SHARD = "single", "ddp", "shard"
SHARD_WAIT_DAYS = 7  # how long sharded ranks wait for each other at the end


def make_accelerator(cfg: TrainConfig, loaded=None):
    """The run's Accelerator, made before the base model loads: under `accelerate launch` it picks this rank's
    device (cuda:LOCAL_RANK), and the model must be loaded there, not on cuda:0 of every rank."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if loaded is not None:
        cpu = loaded.device.type == "cpu"
    else:
        cpu = str(cfg.device or "auto").strip().lower().startswith("cpu") or not torch.cuda.is_available()
    # A rank's rows may not touch every adapter of a family in a step: DDP must not wait for those gradients.
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=cfg.per_label)]
    if cfg.distributed != DDP and why_not_sharded(cfg) is None:
        # Sharded ranks meet only at the end, where the first done waits for the slowest (hours, not the
        # default 30 minutes); a rank that fails ends the launch anyway (torchrun stops the others).
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(days=SHARD_WAIT_DAYS)))
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def load_device(cfg: TrainConfig, accelerator) -> str | None:
    """Where this process loads the base model: its rank's device under `accelerate launch`, else --device."""
    return cfg.device if accelerator.num_processes == 1 else str(accelerator.device)


def why_not_sharded(cfg: TrainConfig) -> str | None:
    """Why this run's adapters cannot train apart, each alone (None: they can)."""
    if not cfg.per_label:
        return "it trains one adapter"
    reasons = []
    if cfg.family_rate:
        reasons.append(f"--family-rate trains {cfg.name}-all on rows of every label, taken from the label "
                       "adapters' rows (--family-rate 0 lifts this)")
    if cfg.contrastive_weight:
        reasons.append("the contrastive loss scores every row under every prefix of the family "
                       "(--contrastive-weight 0 lifts this)")
    if cfg.weights_label_words:
        reasons.append("--label-word-weight ranks each label's words against the other labels' texts "
                       "(--label-word-weight 1 lifts this)")
    if cfg.fills_label_words:
        reasons.append(f"--init-text {PLACEHOLDER} ranks each label's words against the other labels' texts "
                       "(an init text without it, such as \"i feel {label} because\", lifts this)")
    return "; ".join(reasons) or None


def split_mode(cfg: TrainConfig, processes: int, say=print) -> str:
    """SINGLE, DDP or SHARD for this run; `--distributed shard` where it cannot be exact is refused."""
    reason = why_not_sharded(cfg)
    if cfg.distributed == SHARD:
        if reason:
            raise ConfigError(f"--distributed shard: cannot train the adapters apart: {reason}. "
                              "--distributed ddp trains them together on every rank (the one-process result)")
        return SHARD
    if processes == 1:
        return SINGLE
    if cfg.distributed == DDP or reason:
        if reason and cfg.per_label and cfg.distributed == "auto":
            say(f"the family trains as one, with DDP over {processes} processes: {reason}")
        return DDP
    return SHARD


def deal(weights: dict[str, float], processes: int) -> list[list[str]]:
    """Adapters per rank: the heaviest first, each to the least-loaded rank (ties to the lower rank), so the
    ranks finish close together; every rank computes the same deal from the same data."""
    loads = [0.0] * processes
    ranks: list[list[str]] = [[] for _ in range(processes)]
    for name in sorted(weights, key=lambda n: (-weights[n], n)):
        rank = min(range(processes), key=lambda r: (loads[r], r))
        ranks[rank].append(name)
        loads[rank] += weights[name]
    return ranks


def rank_share(rows: int, processes: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a DDP step's batch that `rank` computes; shares differ by at most one row."""
    return rank * rows // processes, (rank + 1) * rows // processes


def ghost_share(batch):
    """A DDP rank's share of a batch with fewer rows than processes: one row that scores no token, so the rank
    still takes part in the gradient exchange and adds nothing to it."""
    ghost = batch.rows(0, 1)
    ghost.labels = torch.full_like(ghost.labels, -100)
    return ghost


def sum_over_ranks(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the ranks (one small all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()

