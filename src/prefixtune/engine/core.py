"""The engine core in its own process (vLLM v1's EngineCore): the model, the policy and the runner, nothing else.

In one process the decode thread shares the GIL with the event loop, the HTTP parsing and the detokenizer: on a
fast accelerator (or a tiny model) the model's own step is a few ms of Python, and every slice of it the other
threads take is a slice the batch waits. Here the core runs Scheduler with an EventSink instead of an output
processor: each step's RowEvents leave as plain tuples over a pipe, and the front end (engine/client.py)
detokenizes, matches stop strings and talks HTTP in its own process, on its own GIL.

Messages (pickled tuples over one duplex multiprocessing Connection):
  front end -> core: ("submit", call, [(request_id, prompt_ids, params, adapter, negative, experts), ...])
                     ("cancel", request_id) | ("adapter", call, "load" | "unload", name, path)
                     ("shutdown", timeout, drain)
  core -> front end: ("ready", info) | ("failed", exception) once at start
                     ("reply", call, None | (kind, message)) | ("events", rows, stats) | ("stopped",)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

from prefixtune.engine.requests import QueueFull, Request, SchedulerClosed

STATS_S = 0.25  # a step with no events (a beam search between its ends) still reports stats this often

# SchedulerStats counters the core owns and reports with every message (finished is counted by the front end).
STAT_FIELDS = ("steps", "step_rows", "last_batch_size", "max_batch_size", "max_adapters_in_batch", "mixed_steps",
               "prefills", "prompt_tokens", "generated_tokens")


@dataclass
class EngineSpec:
    """What the engine process loads and how it batches (the serve command's flags)."""

    model: str  # base model: alias, local folder or .gguf
    store: str | None = None  # adapter store folder (None = the default store)
    device: str | None = None  # auto, cpu, cuda, cuda:N
    dtype: str | None = None  # auto, float32, bfloat16, float16
    force: bool = False  # use adapters trained on another base of the same shape
    max_batch: int = 16  # rows decoded together
    max_queue: int = 256  # waiting rows before QueueFull
    mode: str = "continuous"  # batching: continuous (rows join/leave every step) or grouped (engine/policy.py)
    max_model_len: int | None = None  # virtual + prompt + new tokens per row (None = the model's limit)
    max_inflight_tokens: int = 1 << 19  # prompt + max_new_tokens over in-flight rows
    max_step_tokens: int | str | None = "auto"  # decode rows + prefill tokens per step ("auto": by device; None: whole)
    threads: int | None = None  # torch CPU threads in the engine process (None: runtime.configure_threads' policy)
    compile: bool = False  # compile the decode step (torch.compile), warmed up before the first request
    quantize: str | None = None  # int8 | fp16: quantized frozen base (prefixtune.quantize); None: the model's dtype


class EventSink:
    """The Scheduler's output stage in the core: RowEvents out as (request_id, token, finish, error, beams,
    logprob, prompt_logprobs, stop_token, score)."""

    def __init__(self, conn):
        self.conn = conn
        self.scheduler = None  # set by attach(): whose counters go with every message
        self._lock = threading.Lock()  # the worker and the command thread (cancelling a queued request) both send
        self._sent_steps = 0
        self._last = 0.0

    def attach(self, scheduler) -> None:
        self.scheduler = scheduler

    def start(self) -> None:
        return None

    def close(self, timeout: float = 10.0) -> None:
        return None

    def put(self, events) -> None:
        now = time.monotonic()
        if not events and now - self._last < STATS_S:
            return
        rows = [(e.request.request_id, e.token, e.finish, e.error, e.beams, e.logprob, e.prompt_logprobs,
                 e.stop_token, e.score) for e in events]
        with self._lock:
            self._last = now
            self.conn.send(("events", rows, self._stats()))

    def _stats(self) -> tuple:
        s = self.scheduler.stats
        fresh = min(s.steps - self._sent_steps, len(s.recent))
        self._sent_steps = s.steps
        recent = [s.recent[-i] for i in range(fresh, 0, -1)]  # the steps since the last message (usually one)
        counts = (self.scheduler.waiting, self.scheduler.running)
        return tuple(getattr(s, name) for name in STAT_FIELDS), counts, recent

    def send(self, message: tuple) -> None:
        with self._lock:
            self.conn.send(message)


def main(conn, spec: EngineSpec, env: dict[str, str] | None = None) -> None:
    """The child process: load, say ready (or why not), then serve commands until shutdown. `env`: the front
    end's environment when it started this process (a fork server's children inherit the server's)."""
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        if spec.threads is not None:  # read by runtime.configure_threads when the model loads
            from prefixtune.runtime import THREADS_ENV

            os.environ[THREADS_ENV] = str(spec.threads)
        from prefixtune.engine.lm import PrefixLM
        from prefixtune.models import max_positions
        from prefixtune.engine.scheduler import Scheduler

        lm = PrefixLM.load(spec.model, store=spec.store, device=spec.device, dtype=spec.dtype, force=spec.force,
                           compile=spec.compile, quantize=spec.quantize, max_batch=spec.max_batch)
        if lm.device.type == "cpu":
            # With our 4-D mask transformers repeats the GQA key/value heads before SDPA on CPU (it only lets SDPA
            # share them where the kernel stays fast without a mask, on CUDA); torch's CPU kernel takes the mask
            # and the shared heads. Measured on SmolLM2 (3 kv heads for 9): the copies were 18 of 200 ms of an
            # 8-token chunk at 1400 columns, and grow with every row a long row widens. Inference only: this
            # process trains nothing.
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        sink = EventSink(conn)
        scheduler = Scheduler(lm, max_batch=spec.max_batch, max_queue=spec.max_queue, mode=spec.mode,
                              max_model_len=spec.max_model_len or max_positions(lm.model.config), start=False,
                              max_inflight_tokens=spec.max_inflight_tokens, output=sink,
                              max_step_tokens=spec.max_step_tokens)
        sink.attach(scheduler)
    except BaseException as exc:  # noqa: BLE001 - the front end re-raises it (a user error prints as one line)
        conn.send(("failed", _picklable(exc)))
        return
    loaded = lm.loaded
    conn.send(("ready", {"fingerprint": loaded.fingerprint, "legacy_fingerprint": loaded.legacy_fingerprint,
                         "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device),
                         "max_model_len": scheduler.max_model_len, "compiled": _compiled(lm)}))
    scheduler.start()
    _Commands(lm, scheduler, sink).run(conn)


def _compiled(lm) -> str | None:
    """What the front end prints about the decode step: None when it runs eagerly."""
    step = lm.compiled_decode
    return None if step is None else f"compiled in {step.compile_s:.1f} s"


class _Commands:
    """The core's command thread: requests in, adapter changes mirrored, shutdown."""

    def __init__(self, lm, scheduler, sink: EventSink):
        self.lm, self.scheduler, self.sink = lm, scheduler, sink

    def run(self, conn) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the front end closed the pipe (after "stopped") or died
                self.scheduler.shutdown(timeout=0.0, drain=False)
                return
            except Exception as exc:  # noqa: BLE001 - an unreadable message is dropped, never the process
                _log(f"unreadable command dropped: {type(exc).__name__}: {exc}")
                continue
            try:
                self._handle(message)
            except Exception as exc:  # noqa: BLE001 - one bad command must not end the engine process
                self._refuse(message, exc)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            self.sink.send(("reply", message[1], self._submit(message[2])))
        elif kind == "cancel":
            self.scheduler.cancel(message[1])
        elif kind == "adapter":
            self.sink.send(("reply", message[1], self._adapter(*message[2:])))
        elif kind == "shutdown":  # drained on its own thread: cancels of leaving clients still arrive here
            threading.Thread(target=self._shutdown, args=message[1:], name="prefixtune-shutdown").start()
        else:
            raise ValueError(f"unknown command {kind!r}")

    def _refuse(self, message, exc: Exception) -> None:
        """Log the failure and answer the command's caller (if it waits for a reply) with the error."""
        error = f"{type(exc).__name__}: {exc}"
        _log(f"command {message[0] if isinstance(message, tuple) and message else message!r} failed: {error}")
        if isinstance(message, tuple) and len(message) > 1 and message[0] in ("submit", "adapter"):
            try:
                self.sink.send(("reply", message[1], ("error", error)))
            except Exception as send_error:  # noqa: BLE001 - the pipe is gone: run() sees it next
                _log(f"could not answer: {send_error}")

    def _shutdown(self, timeout: float, drain: bool) -> None:
        self.scheduler.shutdown(timeout=timeout, drain=drain)
        self.sink.send(("stopped",))  # the front end closes the pipe: run() sees EOF and the process exits

    def _kv(self, name: str | None):
        if name is None:
            return None
        with self.scheduler.lm_lock:  # read here, not on the decode thread: a cold adapter never stalls a step
            return self.lm.adapter(name).kv  # (2L, kv_heads, P, head_dim)

    def _submit(self, rows) -> tuple[str, str] | None:
        kv: dict[str | None, object] = {}
        try:
            for _, _, params, adapter, negative, experts in rows:
                names = (adapter, negative) if params.guided else (adapter,)
                for name in names if experts is None else (*experts.parts, *experts.negatives):
                    if name not in kv:
                        kv[name] = self._kv(name)
                if experts is not None:  # a composed request's rows (its spec crossed the pipe without tensors)
                    experts.resolve(kv.__getitem__)
        except Exception as err:  # noqa: BLE001 - the front end checked it; a file changed since, say so
            return "adapter", f"{type(err).__name__}: {err}"
        requests = [Request(ids, adapter, params, prefix=None if experts else kv[adapter], request_id=rid,
                            negative=negative, negative_prefix=kv.get(negative) if params.guided else None,
                            experts=experts)
                    for rid, ids, params, adapter, negative, experts in rows]
        try:
            self.scheduler.submit_many(requests)
        except QueueFull as err:
            return "queue_full", str(err)
        except SchedulerClosed as err:
            return "closed", str(err)
        except ValueError as err:
            return "invalid", str(err)
        return None

    def _adapter(self, op: str, name: str, path: str | None) -> tuple[str, str] | None:
        """Mirror an admin load/unload the front end already made (it checked the name and the files)."""
        try:
            with self.scheduler.lm_lock:
                if op == "unload":
                    self.lm.unload(name)
                    return None
                self.lm.cache.drop(name)  # reloaded from disk: the folder may have been replaced
                if path is not None:
                    self.lm.register(name, path)
                self.lm.adapter(name)
        except Exception as err:  # noqa: BLE001
            return "adapter", f"{type(err).__name__}: {err}"
        return None


def _log(message: str) -> None:
    print(f"prefixtune engine: {message}", file=sys.stderr, flush=True)


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")
