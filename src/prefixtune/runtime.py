"""CPU threads: never let torch's intra-op threads fight other processes for the cores.

On a 2-core machine with other work running, 2 intra-op threads made one SmolLM2 training step
~10x slower than 1 thread (16 s vs 1.7 s, measured here): every op waits for the second thread to
be scheduled. So prefixtune only ever lowers the thread count, to the cores that are free *now*: a short
/proc/stat sample of what other processes use, minus this process and its children. (The 1-minute load
average it replaced still counted the job's own previous step: `make test` then `make demo` ran the demo
on 1 thread of 2.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

THREADS_ENV = "PREFIXTUNE_THREADS"
SAMPLE_S = 0.15  # /proc/stat counts in 10 ms ticks: 0.15 s x 2 cores resolves ~3% of the machine


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def read_proc_stat() -> tuple[int, int] | None:
    """(busy ticks, total ticks) summed over all cores since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def own_ticks() -> float:
    """CPU ticks used by this process and its (waited-for) children so far."""
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")


def busy_other_cores(read_stat: Callable[[], tuple[int, int] | None] = read_proc_stat,
                     own: Callable[[], float] = own_ticks, sleep: Callable[[float], None] = time.sleep,
                     seconds: float = SAMPLE_S, cores: int | None = None) -> float | None:
    """Cores kept busy by OTHER processes during a short sample (None where /proc/stat does not exist)."""
    cores = cores or cpu_count()
    before, own_before = read_stat(), own()
    if before is None:
        return None
    sleep(seconds)
    after, own_after = read_stat(), own()
    if after is None or after[1] <= before[1]:
        return None
    busy = after[0] - before[0] - (own_after - own_before)
    return max(0.0, busy / (after[1] - before[1]) * cores)


def free_cores(others: float | None = None) -> int:
    cores = cpu_count()
    if others is None:
        others = busy_other_cores(cores=cores)
    if others is None:  # no /proc/stat (macOS, Windows): the load average is the best there is
        try:
            others = os.getloadavg()[0]
        except (AttributeError, OSError):
            return cores
    # A core counts as taken only once other work keeps it ~90% busy: on an idle 2-core machine 2 threads
    # made a training step 1.6x faster than 1, so a light background load must not cost that.
    return max(1, min(cores, int(cores - others + 0.9)))


def configure_threads(say=None, others: float | None = None) -> int:
    """Set torch's CPU threads: $PREFIXTUNE_THREADS if set, else lower (never raise) to the free cores.

    `others` (cores busy with other processes) replaces the /proc/stat sample, for tests.
    """
    current = torch.get_num_threads()
    wanted = os.environ.get(THREADS_ENV)
    if wanted:
        torch.set_num_threads(max(1, int(wanted)))
        return torch.get_num_threads()
    if others is None:
        others = busy_other_cores()
    target = min(current, free_cores(others))
    if target < current:
        torch.set_num_threads(target)
        if say is not None:
            busy = f"other processes keep {others:.1f}" if others is not None else "the load average is high on"
            say(f"note: the CPU is busy ({busy} of {cpu_count()} cores): using {target} torch thread(s) "
                f"instead of {current}; set {THREADS_ENV} to override")
    return torch.get_num_threads()


# ---- bf16 on the CPU --------------------------------------------------------------------------------------
# bf16 matmuls beat float32 only on CPUs with bf16 instructions (Intel AMX, AVX512-BF16); elsewhere torch
# emulates them and they are slower. So the precision policy detects, and measures where detected.
BF16_ENV = "PREFIXTUNE_CPU_BF16"  # 0/1 forces the detection (tests; a CPU whose flags lie)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MARGIN = 1.1  # bf16 must be this much faster than float32 at a phase's shapes to be picked


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, instruction flags) of the first CPU ("unknown", empty set where /proc/cpuinfo is missing)."""
    name, flags = "unknown", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


def cpu_bf16(flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether this CPU runs bf16 matmuls natively, the evidence); PREFIXTUNE_CPU_BF16=0/1 overrides it."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"forced by {BF16_ENV}={forced}"
    found = sorted((cpu_info()[1] if flags is None else flags) & set(BF16_FLAGS))
    return bool(found), ", ".join(found) if found else f"none of {', '.join(BF16_FLAGS)} in the CPU flags"


def pick_cpu_dtype(bf16: bool, speedup: float | None) -> torch.dtype:
    """The policy for one phase (prefill, decode or training): bf16 only on a bf16 CPU where it measured at least
    BF16_MARGIN x float32's speed (`speedup`, None = not measured); float32 otherwise."""
    return torch.bfloat16 if bf16 and speedup is not None and speedup >= BF16_MARGIN else torch.float32


def bf16_matmul_speedup(rows: int, hidden: int, out: int, repeats: int = 20) -> float:
    """float32 time / bf16 time of a (rows, hidden) x (hidden, out) matmul, best of `repeats` each (a
    start-up micro-benchmark at a phase's shapes: rows = batch for decode, tokens for prefill)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, out, dtype=dtype)
        a @ b  # first call: allocations, kernel choice
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def cpu_precision(hidden: int, out: int, phases: dict[str, int]) -> dict[str, tuple[torch.dtype, str]]:
    """Per phase ({"prefill": tokens, "decode": rows}): (dtype, why). Measures only on a bf16 CPU."""
    bf16, evidence = cpu_bf16()
    if not bf16:
        return {phase: (torch.float32, f"no bf16 on this CPU ({evidence})") for phase in phases}
    chosen = {}
    for phase, rows in phases.items():
        speedup = bf16_matmul_speedup(rows, hidden, out)
        chosen[phase] = (pick_cpu_dtype(True, speedup), f"bf16 measured {speedup:.2f}x float32 at {rows} rows")
    return chosen
