"""`prefixtune train`'s entry point: check, then train in this process, as a DDP rank, or sharded by adapter.

Above loop (one pass) and sharded (a family's adapters trained apart on the ranks), which both build on loop.
"""

from __future__ import annotations

from prefixtune.train.config import TrainConfig
from prefixtune.train.distributed import DDP, SHARD, make_accelerator, split_mode
from prefixtune.train.loop import TrainResult, train_one
from prefixtune.train.preflight import check_paths
from prefixtune.train.sharded import train_sharded


def train(cfg: TrainConfig, loaded=None, data=None, say=print) -> TrainResult:
    """Train as `cfg` says; `loaded` (a LoadedModel) and `data` (a DataBundle) may be passed in to reuse them.

    All or nothing: settings, paths and OUT are checked before the model loads, OUT is claimed only after the
    data and adapters are planned, and the store sees the adapters only when the run completes. Under
    `accelerate launch` a family's adapters are sharded over the ranks or trained with DDP (train/distributed.py).
    """
    cfg.validate()
    check_paths(cfg)
    accelerator = make_accelerator(cfg, loaded)  # first: it picks this rank's device, which the model loads onto
    mode = split_mode(cfg, accelerator.num_processes, say if accelerator.is_main_process else (lambda *_: None))
    if mode == SHARD:
        return train_sharded(cfg, accelerator, loaded, data, say)
    return train_one(cfg, accelerator, loaded, data, say, ddp=mode == DDP)
