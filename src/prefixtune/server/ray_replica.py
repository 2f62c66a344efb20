"""The Ray Serve replica: one base model running prefixtune's own engine (continuous mixed-adapter batching).

Adapters are Serve *multiplexed models*: `serve.multiplexed(max_num_models_per_replica=K)` keeps an LRU of K
adapters per replica and tells the router which replica holds which id, so an adapter's requests go where it is
already loaded. `@serve.batch` is not used: it splits batches by model id, where the engine mixes adapters in
one decode step. A request's rows arrive together and stream back (index, Output) batches; the first item
says whether the engine took them, so the ingress can answer 429/503/400 as the single-process server does.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from functools import partial

import ray
from ray import serve

from prefixtune.engine.policy import AUTO
from prefixtune.engine.requests import QueueFull, Request, SchedulerClosed
from prefixtune.engine.sampling import SamplingParams

REPORT_S = 0.25  # how often a replica tells the placement board what it holds and runs
BOARD_NAMESPACE = "prefixtune"


@dataclass
class ReplicaConfig:
    """What every replica loads and how its engine batches (the CLI's serve flags)."""

    model: str  # base model: alias, local folder or .gguf
    store: str | None  # adapter store folder (None = the default store); every node must see it
    board: str  # name of the placement board actor (ray_backend.PlacementBoard)
    device: str | None = None  # auto, cpu, cuda (Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU)
    dtype: str | None = None  # auto, float32, bfloat16, float16
    force: bool = False  # serve adapters trained on another base of the same shape
    max_batch: int = 16  # rows decoded together on one replica
    max_queue: int = 256  # waiting requests per replica before 429
    max_step_tokens: int | str | None = AUTO  # decode rows + prefill tokens per step ("auto": by device)
    max_model_len: int | None = None  # virtual + prompt + new tokens per row
    max_inflight_tokens: int = 1 << 19  # prompt + max_tokens over a replica's in-flight rows
    mode: str = "continuous"  # engine batching mode
    max_adapters: int = 8  # K: adapters one replica keeps loaded (Serve's multiplexed LRU)
    preload: list[str] = field(default_factory=list)  # hot adapters every replica loads at start (evictable)
    pin: list[str] = field(default_factory=list)  # adapters every replica holds outside the LRU (never evicted)


class HeldAdapter:
    """One adapter in a replica's multiplexed LRU.

    Serve calls __del__ when the LRU evicts it. Rows already admitted keep working: the engine copied the
    prefix into their KV slots at prefill, and rows still waiting hold the tensor itself; this object only
    lets go of it once no request of its own is still running (`users`).
    """

    def __init__(self, name: str, kv, on_evict):
        self.name, self.kv, self._on_evict = name, kv, on_evict
        self.users = 0
        self.evicted = False
        self._lock = threading.Lock()  # Serve runs __del__ on an executor thread

    def acquire(self):
        with self._lock:
            if self.kv is None:  # never hand out an evicted adapter: the row would run as the base model
                raise RuntimeError(f"adapter {self.name!r} was evicted while loading; retry")
            self.users += 1
            return self.kv

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.evicted and self.users == 0:
                self.kv = None

    def __del__(self) -> None:  # Serve calls it on eviction; Python calls it again at collection
        with self._lock:
            if self.evicted:
                return
            self.evicted = True
            if self.users == 0:
                self.kv = None
        self._on_evict(self)


class ReplicaBase:
    """The engine half of a replica; replica_deployment() adds the multiplexed loader with its K."""

    def __init__(self, cfg: ReplicaConfig):
        from prefixtune.engine.lm import PrefixLM
        from prefixtune.engine.scheduler import Scheduler
        from prefixtune.server.app import model_limit

        self.cfg = cfg
        self.lm = PrefixLM.load(cfg.model, store=cfg.store, device=cfg.device, dtype=cfg.dtype, force=cfg.force)
        self.scheduler = Scheduler(self.lm, max_batch=cfg.max_batch, max_queue=cfg.max_queue, mode=cfg.mode,
                                   max_model_len=cfg.max_model_len or model_limit(self.lm.model),
                                   max_inflight_tokens=cfg.max_inflight_tokens, max_step_tokens=cfg.max_step_tokens)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.held: dict[str, HeldAdapter] = {}  # what the multiplexed LRU holds, in load order
        self.evictions = 0
        self.taken: Counter[str] = Counter()  # requests taken, by adapter
        self.pinned = {name: self._read(name) for name in cfg.pin}
        self.board = ray.get_actor(cfg.board, namespace=BOARD_NAMESPACE)
        self._closed = threading.Event()
        threading.Thread(target=self._report_loop, name="prefixtune-placement", daemon=True).start()

    async def get_adapter(self, name: str) -> HeldAdapter:  # replaced by the multiplexed loader
        raise NotImplementedError

    def _read(self, name: str):
        with self.scheduler.lm_lock:
            kv = self.lm.adapter(name).kv  # (2L, kv_heads, P, head_dim)
            self.lm.cache.drop(name)  # Serve's LRU is the one that decides what stays
        return kv

    async def _load(self, name: str) -> HeldAdapter:
        kv = await asyncio.get_running_loop().run_in_executor(None, self._read, name)
        held = HeldAdapter(name, kv, self._evicted)
        self.held[name] = held
        self._report()
        return held

    def _evicted(self, held: HeldAdapter) -> None:
        if self.held.get(held.name) is held:
            del self.held[held.name]
            self.evictions += 1
        self._report()

    async def preload(self) -> None:
        for name in self.cfg.preload:
            await self.get_adapter(name)

    # ---- calls from the ingress ---------------------------------------------------------------------
    def describe(self) -> dict:
        """What the ingress needs to check adapters and lengths like the single-process server."""
        loaded = self.lm.loaded
        return {"fingerprint": loaded.fingerprint, "legacy_fingerprint": loaded.legacy_fingerprint,
                "dtype": str(self.lm.dtype).removeprefix("torch."), "device": str(self.lm.device)}

    async def generate(self, adapter: str | None, negative: str | None,
                       rows: list[tuple[list[int], SamplingParams]], experts=None) -> AsyncIterator[tuple]:
        """("accepted",) or ("refused", kind, message) first, then ("outputs", [(row, Output), ...]). `experts`:
        a composed request's product of experts without tensors (engine/compose.Experts.spec)."""
        held: list[HeldAdapter] = []

        async def kv_of(name: str | None):
            if name is None:
                return None
            if name in self.pinned:
                return self.pinned[name]
            item = await self.get_adapter(name)
            kv = item.acquire()
            held.append(item)  # released when this request ends
            return kv

        try:
            try:
                prefix, negative_prefix = await kv_of(adapter), await kv_of(negative)
                parts = {}  # a composed request's parts and negatives, each held (and released) like an adapter
                for name in () if experts is None else (*experts.parts, *experts.negatives):
                    if name not in parts:
                        parts[name] = await kv_of(name)
            except Exception as err:  # noqa: BLE001 - an unreadable or incompatible adapter refuses the request
                yield ("refused", "adapter", f"{type(err).__name__}: {err}")
                return
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            requests = [Request(ids, adapter, params, partial(_emit, loop, queue, i), prefix, negative=negative,
                                negative_prefix=negative_prefix,
                                experts=None if experts is None else experts.spec().resolve(parts.__getitem__))
                        for i, (ids, params) in enumerate(rows)]
            try:
                self.scheduler.submit_many(requests)
            except (QueueFull, SchedulerClosed, ValueError) as err:
                kind = {QueueFull: "queue_full", SchedulerClosed: "closed"}.get(type(err), "invalid")
                yield ("refused", kind, str(err))
                return
            if adapter is not None:
                self.taken[adapter] += 1
            yield ("accepted",)
            open_choices = choices_of(requests)
            try:
                while open_choices:
                    batch = [await queue.get()]
                    while not queue.empty():  # everything that arrived meanwhile goes in one message
                        batch.append(queue.get_nowait())
                    for index, out in batch:
                        if out.finish_reason is not None:
                            open_choices.discard((index, out.index))
                    yield ("outputs", batch)
            finally:  # the ingress cancelled (client gone) or the stream broke: free the batch slots
                for index in {row for row, _ in open_choices}:
                    self.scheduler.cancel(requests[index].request_id)
        finally:
            for item in held:
                item.release()

    # ---- placement board ----------------------------------------------------------------------------
    def placement(self) -> dict:
        s = self.scheduler
        stats = {f.name: getattr(s.stats, f.name) for f in fields(s.stats) if f.name not in ("recent", "finished")}
        return {"id": self.id, "pid": os.getpid(), "adapters": list(self.held), "pinned": list(self.pinned),
                "running": s.running, "waiting": s.waiting, "evictions": self.evictions, "requests": dict(self.taken),
                "tokens_per_second": s.stats.tokens_per_second(), "finished": dict(s.stats.finished),
                "stats": stats}

    def _report(self) -> None:
        try:
            self.board.report.remote(self.id, self.placement())
        except Exception:  # noqa: BLE001 - the board is gone (app shutting down): placement is best effort
            pass

    def _report_loop(self) -> None:
        while not self._closed.wait(REPORT_S):
            self._report()

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        self._closed.set()
        try:
            self.board.remove.remote(self.id)
            self.scheduler.shutdown(timeout=5.0)
        except Exception:  # noqa: BLE001
            pass


def choices_of(requests: list[Request]) -> set[tuple[int, int]]:
    """(row, choice) of every choice the rows will finish (a beam request returns num_return_sequences)."""
    return {(row, c) for row, r in enumerate(requests) for c in range(r.params.num_return_sequences)}


def _emit(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, out) -> None:  # output thread
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (index, out))
    except RuntimeError:
        pass  # the replica's loop is closed


def replica_deployment(cfg: ReplicaConfig, num_cpus: float, num_gpus: float, max_ongoing: int,
                       replicas: int, max_replicas: int | None):
    """The bound replica deployment: K (cfg.max_adapters) is fixed when the class is made, as Serve wants."""

    class PrefixReplica(ReplicaBase):
        async def __init__(self, cfg: ReplicaConfig):
            super().__init__(cfg)
            await self.preload()

        @serve.multiplexed(max_num_models_per_replica=cfg.max_adapters)
        async def get_adapter(self, name: str) -> HeldAdapter:
            return await self._load(name)

    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": max(1, cfg.max_batch // 2)}}
               if max_replicas is not None else {"num_replicas": replicas})
    deployment = serve.deployment(PrefixReplica, name="PrefixReplica", max_ongoing_requests=max_ongoing,
                                  ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}, **scaling)
    return deployment.bind(cfg)
