"""The Ray Serve ingress: the very app of `prefixtune serve` (routes, schemas, errors, auth, metrics), with an
engine client that forwards each request's rows to a replica instead of a local Scheduler.

The ingress never runs the model: it holds the tokenizer and the model on the meta device (adapters are
checked against the base model's fingerprint, which a replica reports), and sends token ids. A request's
`model` becomes the multiplexed model id of the replica call, so Serve's router picks a replica that already
holds the adapter, and another one when those are busy (their max_ongoing_requests reached).

A replica that dies (killed, out of memory, its node lost) fails only its own requests: a stream gets an error
event then [DONE], a plain request a 503 with Retry-After (code replica_lost); Serve starts a replacement and
routes the retry to a live replica. Requests on the other replicas are not touched.
"""

from __future__ import annotations

import asyncio
import threading
import time

from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError

from prefixtune.engine.requests import Output, QueueFull, Request, RetryableError, SchedulerClosed, SchedulerStats
from prefixtune.server.app import ServerSettings, create_app
from prefixtune.server.protocol import APIError
from prefixtune.server.ray_replica import choices_of

SNAPSHOT_S = 0.5  # how often the ingress reads the placement board (health, metrics)
STALE_S = 3.0  # a replica silent this long is not listed (it reports every ray_replica.REPORT_S)
RETRY_S = 5  # Retry-After for requests a dead replica dropped (Serve sends the retry to a live replica)
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)


class ReplicaLostMessage(RetryableError):
    """The error of rows whose replica died: jobs.check_errors answers it 503 + Retry-After, not 500."""

    retry_after = RETRY_S
    code = "replica_lost"


class ReplicaLost(SchedulerClosed):
    """The replica Serve picked died before it took the rows (HTTP 503 + Retry-After)."""

    retry_after = RETRY_S
    code = "replica_lost"


def lost_message(err: BaseException) -> str:
    # Ray's own text is a paragraph about OOM killers; the client needs what happened and what to do.
    return (f"the replica serving this request died ({type(err).__name__}); Serve is starting a new one: "
            f"retry in a few seconds")


class ClusterStats(SchedulerStats):
    """SchedulerStats summed over the replicas' latest reports (what /metrics renders)."""

    rate: float = 0.0

    def tokens_per_second(self, window: float = 10.0) -> float:
        return self.rate


class RemoteScheduler:
    """What app.py and jobs.py use of a Scheduler, over Serve handles: one replica call per HTTP request."""

    mode = "continuous"

    def __init__(self, handle, board, max_batch: int, max_queue: int, max_inflight_tokens: int,
                 pinned: list[str]):
        self.handle, self.board = handle, board
        self.max_batch, self.max_queue, self.max_inflight_tokens = max_batch, max_queue, max_inflight_tokens
        self.pinned = frozenset(pinned)  # on every replica: no multiplexed id, any replica serves them
        self.lm_lock = threading.RLock()  # guards the ingress PrefixLM (meta tensors) for the registry
        self.replicas: list[dict] = []  # latest placement board snapshot
        self._seen: dict[str, dict] = {}  # replica id -> its last report, live or gone (counters)
        self.stats = ClusterStats()
        self._calls: dict[str, asyncio.Task] = {}  # request id -> the task pumping its replica stream
        self._closed = False
        self._poller: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- status ---------------------------------------------------------------------------------------
    def start(self) -> None:  # lifespan: on the event loop
        if self._poller is None:
            self._loop = asyncio.get_running_loop()
            self._poller = self._loop.create_task(self._poll())

    @property
    def alive(self) -> bool:
        return not self._closed and bool(self.replicas)

    @property
    def waiting(self) -> int:
        return sum(r["waiting"] for r in self.replicas)

    @property
    def running(self) -> int:
        return sum(r["running"] for r in self.replicas)

    async def placement(self) -> list[dict]:
        self.replicas = sorted(await self.board.snapshot.remote(STALE_S), key=lambda r: r["id"])
        self._sum_stats()
        return self.replicas

    async def _poll(self) -> None:
        while not self._closed:
            try:
                await self.placement()
            except Exception:  # noqa: BLE001 - the board restarting: keep the last snapshot, try again
                pass
            await asyncio.sleep(SNAPSHOT_S)

    def _sum_stats(self) -> None:
        # Counters sum the last report of every replica ever seen, so a replica that died or was scaled down
        # keeps its counts and the Prometheus counters never drop; gauges sum the live replicas only.
        live = {r["id"] for r in self.replicas}
        self._seen.update((r["id"], r) for r in self.replicas)
        stats = ClusterStats()
        for replica_id, r in self._seen.items():
            for key, value in r["stats"].items():
                if key == "last_batch_size" and replica_id not in live:
                    continue
                merge = max if key.startswith("max_") else (lambda a, b: a + b)
                setattr(stats, key, merge(getattr(stats, key), value))
            stats.finished.update(r["finished"])
            stats.rate += r["tokens_per_second"] if replica_id in live else 0.0
        self.stats = stats

    # ---- requests -------------------------------------------------------------------------------------
    async def submit_remote(self, requests: list[Request]) -> None:
        """Send one HTTP request's rows (same adapter) to a replica; raise as Scheduler.submit_many would."""
        if self._closed:
            raise SchedulerClosed("the server is shutting down")
        first = requests[0]
        model_id = first.adapter if first.adapter is not None and first.adapter not in self.pinned else ""
        rows = [(r.prompt_ids, r.params) for r in requests]
        # A composed request's experts cross without tensors; the replica reads the parts from its own LRU.
        experts = None if first.experts is None else first.experts.spec()
        stream = self.handle.options(stream=True, multiplexed_model_id=model_id).generate.remote(
            first.adapter, first.negative, rows, experts)
        try:
            answer = await stream.__anext__()
        except BaseException as err:  # the client left (or the replica died) before the answer: free the rows
            stream.cancel()
            if isinstance(err, REPLICA_LOST):
                raise ReplicaLost(lost_message(err)) from err
            raise
        if answer[0] == "refused":
            kind, message = answer[1], answer[2]
            if kind == "queue_full":
                raise QueueFull(message)
            if kind == "closed":
                raise SchedulerClosed(message)
            if kind == "adapter":
                raise APIError(400, f"adapter {first.adapter!r} cannot be used: {message}", param="model",
                               code="adapter_incompatible")
            raise ValueError(message)
        task = asyncio.get_running_loop().create_task(self._pump(stream, requests))
        for r in requests:
            self._calls[r.request_id] = task

    async def _pump(self, stream, requests: list[Request]) -> None:
        open_choices = choices_of(requests)
        tokens = dict.fromkeys(open_choices, 0)
        finish, error = "abort", None
        try:
            async for _kind, batch in stream:
                for index, out in batch:
                    tokens[index, out.index] = out.completion_tokens
                    if out.finish_reason is not None:
                        open_choices.discard((index, out.index))
                    requests[index].emit(out)
        except asyncio.CancelledError:
            stream.cancel()  # the replica's generator gets CancelledError and frees the batch slots
            finish = "cancelled"
        except REPLICA_LOST as err:  # the replica died mid-stream: fail its rows, keep serving
            finish, error = "error", ReplicaLostMessage(lost_message(err))
        except Exception as err:  # noqa: BLE001 - the replica's call failed otherwise: fail its rows as well
            finish, error = "error", f"replica failed: {type(err).__name__}: {err}"
        finally:
            for index, choice in sorted(open_choices):  # every choice ends with a final Output, as locally
                r = requests[index]
                r.emit(Output(r.request_id, "", [], finish, tokens[index, choice], error, index=choice))
            for r in requests:
                self._calls.pop(r.request_id, None)

    def cancel(self, request_id: str) -> bool:
        task = self._calls.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True

    def shutdown(self, timeout: float = 10.0, drain: bool = True) -> bool:
        """Refuse new requests; let in-flight ones finish for up to `timeout` s (drain), then cancel the rest."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while drain and self._calls and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._poller is not None:  # the tasks belong to the event loop: cancel them there
            self._loop.call_soon_threadsafe(self._cancel_all)
        return True

    def _cancel_all(self) -> None:
        for task in {*self._calls.values(), self._poller}:
            task.cancel()


@serve.ingress()
class PrefixIngress:
    """The HTTP front: create_app over a RemoteScheduler, plus GET /v1/adapters/placement."""

    async def __init__(self, replica, settings: ServerSettings, cfg, board_name: str):
        import ray
        import torch

        from prefixtune.engine.lm import PrefixLM
        from prefixtune.models import load_shell
        from prefixtune.server.ray_replica import BOARD_NAMESPACE

        info = await replica.describe.remote()  # waits for a replica: its fingerprint checks adapters here
        loaded = load_shell(cfg.model, getattr(torch, info["dtype"]), info["fingerprint"],
                            info["legacy_fingerprint"])
        self.lm = PrefixLM(loaded, cfg.store, force=cfg.force)
        board = ray.get_actor(board_name, namespace=BOARD_NAMESPACE)
        self.scheduler = RemoteScheduler(replica, board, cfg.max_batch, cfg.max_queue, cfg.max_inflight_tokens,
                                         cfg.pin)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        app = create_app(self.lm, self.scheduler, self.settings)
        scheduler = self.scheduler

        @app.get("/v1/adapters/placement")
        async def placement():
            replicas = await scheduler.placement()
            keys = ("id", "pid", "adapters", "pinned", "running", "waiting", "evictions", "requests")
            return {"replicas": [{k: r[k] for k in keys} | {"mixed_steps": r["stats"]["mixed_steps"]}
                                 for r in replicas]}

        return app
