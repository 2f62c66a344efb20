"""Helpers for the serving tests (a uniquely named module: test files import it directly)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import uvicorn

from prefixtune.engine.client import EngineClient, EngineSpec
from prefixtune.engine.supervisor import SupervisedEngine
from prefixtune.engine.lm import PrefixLM
from prefixtune.engine.scheduler import Scheduler
from prefixtune.models import LoadedModel
from prefixtune.server import ServerSettings, create_app
from prefixtune.server.runner import GracefulServer, bind
from prefixtune.testing import write_random_adapter

API_KEY = "sk-test-key"
ADAPTERS = {"alpha": 4, "beta": 7}  # name -> num_virtual_tokens (different lengths must mix in one batch)


def write_adapter(folder: Path, loaded: LoadedModel, name: str, num_virtual_tokens: int, seed: int) -> Path:
    """A random adapter strong enough that greedy outputs differ from the base model and from each other."""
    return write_random_adapter(folder.parent, name, loaded, tokens=num_virtual_tokens, seed=seed, scale=10.0,
                                template="Emotion: {label}\nText:")


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, lm: PrefixLM, settings: ServerSettings, engine_process: bool = False,
                 supervised: int | None = None, **scheduler_kwargs):
        if engine_process:  # as `prefixtune serve` runs by default: the model in its own process, lm a shell here
            spec = EngineSpec(str(lm.loaded.path), str(lm.store.root), device="cpu", dtype="float32",
                              **scheduler_kwargs)
            # supervised=N: restarted up to N times when it dies, as `prefixtune serve --engine-restarts N`
            self.scheduler = EngineClient(spec) if supervised is None else SupervisedEngine(spec, supervised)
            lm = self.scheduler.lm
        else:
            self.scheduler = Scheduler(lm, start=False, **scheduler_kwargs)
        self.lm = lm
        self.app = create_app(lm, self.scheduler, settings)
        sock = bind("127.0.0.1", 0)
        self.root = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.url = self.root + "/v1"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=settings.shutdown_timeout)
        self.server = GracefulServer(config, self.scheduler, settings.shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.api_key = settings.api_key

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "server did not stop"

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key or self.api_key or "none", max_retries=0,
                             timeout=30)

    def http(self, api_key: str | None = None) -> httpx.Client:
        key = api_key or self.api_key
        return httpx.Client(base_url=self.root, timeout=30, headers={"Authorization": f"Bearer {key}"} if key else {})


@contextlib.contextmanager
def live_server(lm: PrefixLM, **kwargs) -> Iterator[LiveServer]:
    """Settings fields and Scheduler kwargs (max_batch, max_queue, mode, max_inflight_tokens) mixed, for brevity."""
    sched = {k: kwargs.pop(k) for k in ("max_batch", "max_queue", "mode", "max_inflight_tokens") if k in kwargs}
    engine_process = kwargs.pop("engine_process", False)
    supervised = kwargs.pop("supervised", None)
    settings = ServerSettings(model_name="tiny-base", **kwargs)
    server = LiveServer(lm, settings, engine_process, supervised, **sched).start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def gated_model(lm: PrefixLM) -> Iterator[threading.Event]:
    """Every forward of the base model waits for the returned event: holds the worker at a known point."""
    gate = threading.Event()

    def hold(*_):
        gate.wait(20)  # returns None: a pre-hook's return value would replace the inputs

    handle = lm.model.register_forward_pre_hook(hold)
    try:
        yield gate
    finally:
        gate.set()
        handle.remove()


@contextlib.contextmanager
def slow_model(lm: PrefixLM, seconds: float) -> Iterator[None]:
    handle = lm.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def counters(metrics_text: str) -> dict[tuple, float]:
    """Every prefixtune counter in a /metrics text: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(metrics_text)
            if f.type == "counter" for s in f.samples if s.name.startswith("prefixtune_") and s.name.endswith("_total")}
