"""Thread policy: decided from what other processes use now (a /proc/stat sample minus our own ticks),
only ever lowered, and the environment variable wins."""

from __future__ import annotations

import torch

from prefixtune import runtime


def _sample(busy_ticks: int, own_ticks: float, total_ticks: int = 200):
    """A fake /proc/stat pair: the machine used `busy_ticks` of `total_ticks`; this process `own_ticks`."""
    stats = iter([(1000, 5000), (1000 + busy_ticks, 5000 + total_ticks)])
    owns = iter([10.0, 10.0 + own_ticks])
    return dict(read_stat=lambda: next(stats), own=lambda: next(owns), sleep=lambda s: None, cores=2)


def test_other_processes_are_measured_and_our_own_ticks_excluded():
    assert runtime.busy_other_cores(**_sample(busy_ticks=200, own_ticks=0)) == 2.0  # others fill both cores
    assert runtime.busy_other_cores(**_sample(busy_ticks=200, own_ticks=200)) == 0.0  # all of it was us
    assert runtime.busy_other_cores(**_sample(busy_ticks=150, own_ticks=100)) == 0.5
    assert runtime.busy_other_cores(read_stat=lambda: None) is None  # no /proc/stat: caller falls back


def test_busy_cpu_lowers_threads_and_a_past_load_does_not(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
        monkeypatch.setattr(runtime, "cpu_count", lambda: 2)
        # The 1-minute load average still remembers the previous job (e.g. `make test`): it is not consulted.
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
        torch.set_num_threads(2)
        assert runtime.configure_threads(others=0.0) == 2, "idle now: both threads, whatever the load average"
        own = runtime.busy_other_cores(**_sample(busy_ticks=200, own_ticks=190))
        assert runtime.configure_threads(others=own) == 2, "our own previous step never halves the threads"
        assert runtime.configure_threads(others=0.6) == 2, "a light background load keeps both threads"
        said = []
        assert runtime.configure_threads(say=said.append, others=1.2) == 1
        assert "other processes keep 1.2 of 2 cores" in said[0] and "using 1 torch thread" in said[0]
        assert runtime.configure_threads(others=0.0) == 1, "never raised above the current count"
        monkeypatch.setenv(runtime.THREADS_ENV, "2")
        assert runtime.configure_threads(others=2.0) == 2
    finally:
        torch.set_num_threads(before)


def test_real_sample_on_this_machine():
    cores = runtime.cpu_count()
    assert runtime.free_cores(0.0) == cores  # an idle machine: every core
    assert runtime.free_cores(float(cores)) == 1  # every core taken: still one thread, never zero
    others = runtime.busy_other_cores(seconds=0.05)  # a real /proc/stat sample (None where there is none)
    assert others is None or isinstance(others, float)
