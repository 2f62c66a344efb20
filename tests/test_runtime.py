"""Thread policy: only ever lowered, to the free cores; the environment variable wins."""

from __future__ import annotations

import torch

from prefixtune import runtime


def test_busy_cpu_lowers_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
        monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
        said = []
        assert runtime.configure_threads(say=said.append) == 1
        assert "using 1 torch thread" in said[0]
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert runtime.configure_threads() == 1, "never raised above the current count"
        torch.set_num_threads(2)
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.6, 0.6, 0.6))
        assert runtime.configure_threads() == 2, "a light background load keeps both threads"
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 1.2, 1.2))
        assert runtime.configure_threads() == 1
        monkeypatch.setenv(runtime.THREADS_ENV, "2")
        assert runtime.configure_threads() == 2
    finally:
        torch.set_num_threads(before)
