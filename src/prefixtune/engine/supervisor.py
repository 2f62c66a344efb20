"""A supervised engine process: the EngineClient interface over a core that is started again when it dies.

When the core exits (killed, out of memory, a crash in native code), its EngineClient fails every in-flight
request at once with an error (a stream gets an error event, then [DONE]); requests that arrive meanwhile are
refused with EngineRestarting (HTTP 503 with Retry-After) and `/health` says "restarting". A new core is
started after a bounded back-off, the adapters loaded by path are loaded into it again (store adapters load on
first use, as always), and serving goes on. After `max_restarts` deaths within `window_s` seconds it stops
trying: `state` becomes "failed" with the reason, and the server exits non-zero so an orchestrator (systemd,
Kubernetes) restarts the whole process, as vLLM and TGI do.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from prefixtune.engine.client import EngineClient, EngineSpec
from prefixtune.engine.requests import Request, SchedulerClosed, SchedulerStats

BACKOFF_S = (0.5, 2.0, 8.0)  # waits before the 1st, 2nd, 3rd+ restart in a row


class EngineRestarting(SchedulerClosed):
    """The engine process died and a new one is starting: retry in a few seconds (HTTP 503 + Retry-After)."""

    retry_after = 5


class SupervisedEngine:
    def __init__(self, spec: EngineSpec, max_restarts: int = 3, window_s: float = 300.0,
                 start_timeout: float = 900.0):
        self.spec, self.max_restarts, self.window_s = spec, max_restarts, window_s
        self.start_timeout = start_timeout
        self.client = EngineClient(spec, start_timeout)  # a model that cannot load fails here, unsupervised
        self.lm, self.info = self.client.lm, self.client.info
        self.stats: SchedulerStats = self.client.stats  # every core's client counts into this one object
        self.state = "ok"  # ok | restarting | failed
        self.reason: str | None = None  # why the last core died, or why supervision gave up
        self.restarts = 0  # cores started after the first
        self._deaths: deque[float] = deque()
        self._by_path: dict[str, str] = {}  # adapters loaded by path, loaded again into every new core
        self._closing = False
        self._watcher: threading.Thread | None = None

    # ---- the Scheduler's interface, forwarded to the current core's client -------------------------------
    def __getattr__(self, name: str):
        if name == "client":  # not set yet: __init__ failed
            raise AttributeError(name)
        return getattr(self.client, name)

    @property
    def max_model_len(self) -> int | None:
        return self.client.max_model_len

    @max_model_len.setter
    def max_model_len(self, value: int | None) -> None:  # the server settles it after start-up
        self.client.max_model_len = value

    def start(self) -> None:
        self.client.start()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="prefixtune-supervisor", daemon=True)
            self._watcher.start()

    @property
    def alive(self) -> bool:
        return self.state == "ok" and self.client.alive

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def submit_many(self, requests: Sequence[Request]) -> list[str]:
        self._check()
        return self.client.submit_many(requests)

    async def submit_remote(self, requests: Sequence[Request]) -> list[str]:
        self._check()
        return await self.client.submit_remote(requests)

    def submit(self, request: Request) -> str:
        return self.submit_many([request])[0]

    def adapter_changed(self, op: str, name: str, path: str | None = None, timeout: float | None = None) -> None:
        self._check()
        self.client.adapter_changed(op, name, path, timeout)
        if op == "load" and path is not None:
            self._by_path[name] = path
        else:
            self._by_path.pop(name, None)

    def shutdown(self, timeout: float = 10.0, drain: bool = True) -> bool:
        self._closing = True
        return self.client.shutdown(timeout, drain)

    def _check(self) -> None:
        if self.state == "restarting":
            raise EngineRestarting(f"the engine process is restarting ({self.reason}); retry in a few seconds")
        if self.state == "failed":
            raise SchedulerClosed(f"the engine process failed and was not restarted: {self.reason}")

    # ---- supervision -----------------------------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            self.client.process.join()
            if self._closing:
                return
            self.client._closed = True  # noqa: SLF001 - no new submission may reach the dead client
            self.reason = f"engine process exited (code {self.client.process.exitcode})"
            self.state = "restarting"
            _log(f"{self.reason}; restarting it")
            if not self._restart():
                return

    def _restart(self) -> bool:
        """Start cores until one runs (True) or the restart budget is spent (False: state 'failed')."""
        while True:
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > self.window_s:
                self._deaths.popleft()
            if len(self._deaths) > self.max_restarts:
                self.state = "failed"
                self.reason = (f"{len(self._deaths)} engine failures within {self.window_s:.0f} s, the last: "
                               f"{self.reason}")
                _log(f"giving up: {self.reason}")
                return False
            time.sleep(BACKOFF_S[min(len(self._deaths), len(BACKOFF_S)) - 1])
            if self._closing:
                return False
            try:
                self._replace()
                return True
            except Exception as exc:  # noqa: BLE001 - a core that cannot start counts as another failure
                self.reason = f"the new engine process failed to start: {type(exc).__name__}: {exc}"
                _log(self.reason)

    def _replace(self) -> None:
        client = EngineClient(self.spec, self.start_timeout)
        client.max_model_len = self.client.max_model_len
        client.carry_counters(self.stats)  # the dead core's last totals: counters go on, never back to 0
        client.stats, client.output.stats = self.stats, self.stats
        client.start()
        try:
            for name, path in list(self._by_path.items()):
                client.adapter_changed("load", name, path)
        except Exception:
            client.shutdown(timeout=0.0, drain=False)
            raise
        self.client = client
        self.restarts += 1
        self.state, self.reason = "ok", None
        _log(f"engine process restarted ({self.restarts} so far)")


def _log(message: str) -> None:
    print(f"prefixtune serve: {message}", file=sys.stderr, flush=True)
