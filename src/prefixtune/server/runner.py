"""Run the app under uvicorn on a socket we bind ourselves, so `--port 0` works and the printed URL is real."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import sys
import threading

import uvicorn

from prefixtune.engine.scheduler import Scheduler
from prefixtune.server.app import ServerSettings, create_app


SWITCH_INTERVAL = 0.0005  # seconds (Python's default is 0.005)


class GracefulServer(uvicorn.Server):
    """uvicorn, but shutdown first drains the scheduler (new requests get 503), then aborts what is left.

    Aborted rows end their streams with finish_reason "abort" and [DONE] instead of a cut connection, and
    uvicorn's own wait for open connections is then short.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, timeout: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.timeout = timeout

    async def on_tick(self, counter: int) -> bool:
        # A supervised engine that gave up (engine/supervisor.py): stop, so the process exits non-zero.
        if getattr(self.scheduler, "failed", False):
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        await asyncio.to_thread(self.scheduler.shutdown, self.timeout)
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(lm, scheduler: Scheduler, settings: ServerSettings, log_level: str = "warning", out=None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get settings.shutdown_timeout seconds to finish."""
    out = out or sys.stdout
    # With --no-engine-process the decode thread takes the GIL back after every torch call; with the default 5 ms
    # switch interval it can wait that long behind the event loop formatting streams. A short interval keeps the
    # model fed (an engine process has no event loop to wait behind).
    sys.setswitchinterval(float(os.environ.get("PREFIXTUNE_SWITCH_INTERVAL", SWITCH_INTERVAL)))
    app = create_app(lm, scheduler, settings)
    sock = bind(settings.host, settings.port)
    adapters = app.state.registry.names()
    print(f"prefixtune serve: {url_of(sock)}", file=out)
    # An engine process (engine/client.py) reports where the weights are; this process holds none.
    engine = getattr(scheduler, "info", None)
    where = engine or {"device": lm.device, "dtype": str(lm.model.dtype)}
    print(f"  model: {settings.model_name} ({where['device']}, {str(where['dtype']).removeprefix('torch.')})"
          + (", engine process" if engine else ""), file=out)
    compiled = engine.get("compiled") if engine else getattr(getattr(lm, "compiled_decode", None), "compile_s", None)
    if compiled is not None:
        print(f"  decode step: {compiled if isinstance(compiled, str) else f'compiled in {compiled:.1f} s'}", file=out)
    print(f"  adapters ({len(adapters)}): {', '.join(adapters) or 'none'}  [store {lm.store.root}]", file=out)
    print(f"  batching: {scheduler.mode}, max batch {scheduler.max_batch}, max queue {scheduler.max_queue}", file=out)
    print(f"  auth: {'API key required' if settings.api_key else 'none'}; "
          f"admin endpoints: {'on' if settings.admin else 'off'}", file=out)
    if not settings.api_key and not is_loopback(settings.host):
        print(f"  warning: listening on {settings.host} without --api-key: anyone who can reach it can use it",
              file=out)
    out.flush()
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=settings.shutdown_timeout,
                            lifespan="on", access_log=False)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal against the handler that was
    # installed before it started; with the default one the process would die by the signal (status 143)
    # after having shut down cleanly. This handler turns that re-raise into a normal exit.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _exit_quietly) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        GracefulServer(config, scheduler, settings.shutdown_timeout).run(sockets=[sock])
    except SystemExit:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("prefixtune serve: stopped", file=out, flush=True)


def _exit_quietly(signum, frame) -> None:
    raise SystemExit(0)
