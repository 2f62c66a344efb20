"""`prefixtune serve --backend ray`: N engine replicas on Ray Serve behind the same OpenAI-compatible API.

Imported only for --backend ray, so the plain server never imports ray. Layout (docs/ARCHITECTURE.md, "Ray Serve"):
  ingress (ray_ingress.py)  the FastAPI app of `prefixtune serve`; `model` -> multiplexed model id
  replicas (ray_replica.py) one base model each, prefixtune's engine, an LRU of K adapters (serve.multiplexed)
  PlacementBoard (here)     what each live replica holds and runs, for GET /v1/adapters/placement
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from prefixtune.server.app import ServerSettings
from prefixtune.server.ray_ingress import PrefixIngress
from prefixtune.server.ray_replica import BOARD_NAMESPACE, ReplicaConfig, replica_deployment


@dataclass
class RayOptions:
    """How the replicas are placed on the cluster (ReplicaConfig says what each one runs)."""

    replicas: int = 1  # engine replicas at start (one per GPU on a GPU cluster)
    max_replicas: int | None = None  # autoscale between `replicas` and this on ongoing requests (None = fixed)
    address: str | None = None  # ray://head:10001, "auto" (the cluster this node joined), None = start one here
    replica_cpus: float = 1.0  # CPUs Ray reserves per replica
    replica_gpus: float | None = None  # GPUs per replica; None = 1 when CUDA is present, else 0
    max_ongoing_requests: int | None = None  # HTTP requests one replica takes before the router spills over
    app_name: str = "prefixtune"  # Serve application name (and the placement board's suffix)
    route_prefix: str = "/"  # where the app sits on Serve's HTTP port (several apps can share it)
    local_cpus: int | None = None  # CPUs of a cluster started here (None = all of this machine's)


@ray.remote(num_cpus=0)
class PlacementBoard:
    """Latest report of every replica; a replica that stops reporting drops out of the snapshot."""

    def __init__(self):
        self.entries: dict[str, dict] = {}

    def report(self, replica_id: str, info: dict) -> None:
        self.entries[replica_id] = info | {"heard": time.monotonic()}  # the board's clock: nodes' clocks differ

    def remove(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def snapshot(self, max_age: float) -> list[dict]:
        """Replicas heard from within max_age seconds (a dead one stops reporting)."""
        now = time.monotonic()
        return [info for info in self.entries.values() if now - info["heard"] < max_age]


def board_name(opts: RayOptions) -> str:
    return f"placement-{opts.app_name}"


def connect(opts: RayOptions) -> None:
    """Join the cluster at opts.address, or start a local one."""
    if ray.is_initialized():
        return
    if opts.address is None:
        # Ray runs its workers at nice 15: on a machine with other work the replicas (and Serve's proxy)
        # then starve; Serve's 5 s proxy readiness check failed here on a loaded 2-core machine.
        os.environ.setdefault("RAY_worker_niceness", "0")
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    # The replicas run this very prefixtune (its package folder shipped with the job), not whatever version a
    # node has installed.
    package = str(Path(__file__).resolve().parents[1])
    ray.init(address=opts.address, num_cpus=opts.local_cpus if opts.address is None else None,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"py_modules": [package]})


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def deploy(cfg: ReplicaConfig, settings: ServerSettings, opts: RayOptions) -> str:
    """Start (or update) the application; returns the API's base URL once every replica is up."""
    import torch

    port = settings.port or free_port(settings.host)  # Serve's proxy needs a concrete port
    gpus = opts.replica_gpus if opts.replica_gpus is not None else float(torch.cuda.is_available())
    PlacementBoard.options(name=cfg.board, namespace=BOARD_NAMESPACE, lifetime="detached",
                           get_if_exists=True).remote()
    serve.start(http_options={"host": settings.host, "port": port})
    replica = replica_deployment(cfg, opts.replica_cpus, gpus, opts.max_ongoing_requests or cfg.max_batch,
                                 opts.replicas, opts.max_replicas)
    ingress = serve.deployment(PrefixIngress, name="PrefixIngress", max_ongoing_requests=max(cfg.max_queue, 64),
                               ray_actor_options={"num_cpus": 0})
    serve.run(ingress.bind(replica, settings, cfg, cfg.board), name=opts.app_name, route_prefix=opts.route_prefix)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{port}{opts.route_prefix.rstrip('/')}/v1"


def undeploy(opts: RayOptions) -> None:
    """Remove the application and its board (the cluster itself stays unless this process started it)."""
    serve.delete(opts.app_name)
    try:
        ray.kill(ray.get_actor(board_name(opts), namespace=BOARD_NAMESPACE))
    except ValueError:
        pass  # already gone


def serve_ray(cfg: ReplicaConfig, settings: ServerSettings, opts: RayOptions, out=None) -> None:
    """Deploy, print where it listens, and keep it up until SIGINT/SIGTERM."""
    out = out or sys.stdout
    connect(opts)
    url = deploy(cfg, settings, opts)
    scale = f"{opts.replicas}..{opts.max_replicas} (autoscaling)" if opts.max_replicas else str(opts.replicas)
    print(f"prefixtune serve (ray): {url}", file=out)
    print(f"  model: {settings.model_name}; replicas: {scale}; adapters per replica: {cfg.max_adapters}"
          f"{'; pinned: ' + ', '.join(cfg.pin) if cfg.pin else ''}", file=out)
    print(f"  placement: GET {url}/adapters/placement; cluster: {opts.address or 'started here'}", file=out)
    out.flush()
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    undeploy(opts)
    if opts.address is None:
        serve.shutdown()
        ray.shutdown()
    print("prefixtune serve (ray): stopped", file=out, flush=True)
