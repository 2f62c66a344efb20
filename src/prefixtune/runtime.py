"""CPU threads: never let torch's intra-op threads fight other processes for the cores.

On a 2-core machine with other work running, 2 intra-op threads made one SmolLM2 training step
~10x slower than 1 thread (16 s vs 1.7 s, measured here): every op waits for the second thread to
be scheduled. So prefixtune only ever lowers the thread count, to the cores that are actually free.
"""

from __future__ import annotations

import os

import torch

THREADS_ENV = "PREFIXTUNE_THREADS"


def free_cores() -> int:
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    # A core counts as taken only once other work keeps it ~90% busy: on an idle 2-core machine 2 threads
    # made a training step 1.6x faster than 1, so a light background load must not cost that.
    return max(1, min(cores, int(cores - busy + 0.9)))


def configure_threads(say=None) -> int:
    """Set torch's CPU threads: $PREFIXTUNE_THREADS if set, else lower (never raise) to the free cores."""
    current = torch.get_num_threads()
    wanted = os.environ.get(THREADS_ENV)
    if wanted:
        torch.set_num_threads(max(1, int(wanted)))
        return torch.get_num_threads()
    target = min(current, free_cores())
    if target < current:
        torch.set_num_threads(target)
        if say is not None:
            say(f"note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): using "
                f"{target} torch thread(s) instead of {current}; set {THREADS_ENV} to override")
    return torch.get_num_threads()
