"""Ctrl-C and SIGTERM during training: a flag checked between steps, so a checkpoint gets written first."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class Interrupted:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a checkpoint gets written."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self):
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
