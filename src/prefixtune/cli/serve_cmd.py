"""`prefixtune serve`: the base model and every adapter of a store behind an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prefixtune.cli.common import user_errors
from prefixtune.cli.derive import Spec, config_flags
from prefixtune.engine.policy import step_tokens as check_step_tokens


AT_LEAST_1 = {"min": 1}
# HTTP-side limits (ServerSettings), the engine's loading and batching (EngineSpec), Ray's placement (RayOptions)
# and a replica's LRU (ReplicaConfig); a derived flag not given takes the dataclass's default.
SERVER = Spec("prefixtune.server.state:ServerSettings",
              exclude={"model_name": "--served-model-name", "adapter_roots": "--adapter-root (repeatable)",
                       "max_stop_strings": "OpenAI's limit"},
              options={"api_key": {"envvar": "PREFIXTUNE_API_KEY"}, "max_compose": {"min": 2},
                       "shutdown_timeout": {"min": 0},
                       **dict.fromkeys(("max_body_bytes", "max_model_len", "max_tokens", "max_prompt_tokens",
                                        "max_n", "max_num_beams", "max_stop_chars"), AT_LEAST_1)})
ENGINE = Spec("prefixtune.engine.core:EngineSpec",
              only=("store", "device", "dtype", "force", "max_batch", "max_queue", "mode", "max_inflight_tokens",
                    "compile", "quantize"),
              names={"mode": ("--batching",)}, options=dict.fromkeys(("max_batch", "max_queue",
                                                                      "max_inflight_tokens"), AT_LEAST_1))
RAY = Spec("prefixtune.server.ray_backend:RayOptions",
           only=("replicas", "max_replicas", "address", "replica_cpus", "replica_gpus"), help_prefix="ray: ",
           options={"replicas": AT_LEAST_1, "max_replicas": AT_LEAST_1, "replica_cpus": {"min": 0},
                    "replica_gpus": {"min": 0}})
REPLICA = Spec("prefixtune.server.ray_replica:ReplicaConfig", only=("max_adapters",), help_prefix="ray: ",
               names={"max_adapters": ("--max-adapters-per-replica",)}, options={"max_adapters": AT_LEAST_1})


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @user_errors
    @config_flags(SERVER, ENGINE, RAY, REPLICA)
    def _cmd(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Base model: alias, local folder or .gguf."),
        served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                        help="Base model id in the API (default: --model)."),
        adapter_root: Optional[list[Path]] = typer.Option(
            None, "--adapter-root", help="Folder POST /v1/adapters may load adapters from by path (repeatable)."),
        max_step_tokens: str = typer.Option("auto", "--max-step-tokens",
                                            help="Tokens per engine step: one per decoding row plus prompt tokens of "
                                                 "joining requests (chunked prefill). auto: 24 on CPU, 2048 on CUDA; "
                                                 "0: prompts join whole."),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
        backend: str = typer.Option("local", "--backend", help="local (this machine) or ray (Ray Serve replicas)."),
        engine_process: bool = typer.Option(
            True, "--engine-process/--no-engine-process",
            help="local: run the model in its own process (HTTP and text off its GIL)."),
        engine_restarts: int = typer.Option(3, "--engine-restarts", min=0,
                                            help="local: restarts of a dead engine process within 5 minutes; one more "
                                                 "death and the server exits with status 1."),
        preload: Optional[list[str]] = typer.Option(
            None, "--preload", help="ray: adapter every replica loads at start (repeatable)."),
        pin: Optional[list[str]] = typer.Option(
            None, "--pin", help="ray: adapter held by every replica, never evicted (repeatable)."),
        **given: Any,
    ) -> None:
        """Serve the base model and every adapter over an OpenAI-compatible API (model = adapter name)."""
        from prefixtune.engine.core import EngineSpec
        from prefixtune.engine.scheduler import MODES
        from prefixtune.quantize import check_quantize
        from prefixtune.server.app import ServerSettings

        server, engine, ray, replica = (spec.take(given) for spec in (SERVER, ENGINE, RAY, REPLICA))
        if engine.get("mode", "continuous") not in MODES:
            raise typer.BadParameter(f"choose one of {', '.join(MODES)}", param_hint="--batching")
        _check_backend(backend, {**{RAY.flag(k): v for k, v in ray.items()},
                                 **{REPLICA.flag(k): v for k, v in replica.items()}, "--preload": preload,
                                 "--pin": pin})
        engine["quantize"] = check_quantize(engine.get("quantize"))
        # A folder or .gguf path makes an awkward model id; its last component is what people type.
        default_id = Path(model).name if ("/" in model or model.lower().endswith(".gguf")) else model
        settings = ServerSettings(model_name=served_model_name or default_id, adapter_roots=list(adapter_root or []),
                                  **server)
        spec = EngineSpec(model, max_model_len=settings.max_model_len, max_step_tokens=_step_tokens(max_step_tokens),
                          **engine)
        if backend == "ray":
            if spec.compile or spec.quantize:
                raise typer.BadParameter("--compile and --quantize serve the local backend; drop them for --backend "
                                         "ray", param_hint="--compile" if spec.compile else "--quantize")
            from dataclasses import asdict

            from prefixtune.cli.serve_ray import run_ray

            replica.update(preload=list(preload or []), pin=list(pin or []))
            local_only = ("threads", "compile", "quantize")
            run_ray(settings, {**{k: v for k, v in asdict(spec).items() if k not in local_only}, **replica}, ray)
            return
        _serve_local(spec, settings, engine_process, engine_restarts, log_level)


def _check_backend(backend: str, ray_flags: dict[str, Any]) -> None:
    if backend not in ("local", "ray"):
        raise typer.BadParameter("choose local or ray", param_hint="--backend")
    given = [flag for flag, value in ray_flags.items() if value is not None and value != []]
    if backend == "local" and given:
        raise typer.BadParameter(f"{given[0]} needs --backend ray", param_hint=given[0])


def _step_tokens(value: str) -> int | str | None:
    """--max-step-tokens as the engine takes it: "auto", an int >= 2, or None (0: prompts join whole)."""
    try:
        step_tokens = value if value == "auto" else int(value)
        check_step_tokens(step_tokens, "cpu")
    except ValueError:
        raise typer.BadParameter("an integer >= 2, 0 (prompts join whole) or auto",
                                 param_hint="--max-step-tokens") from None
    return step_tokens or None


def _serve_local(spec, settings, engine_process: bool, engine_restarts: int, log_level: str) -> None:
    """The local backend: the engine in its own process (or this one), then uvicorn until a signal."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.engine.scheduler import Scheduler
    from prefixtune.server.app import model_limit
    from prefixtune.server.runner import serve

    if engine_process:
        from prefixtune.engine.supervisor import SupervisedEngine

        scheduler = SupervisedEngine(spec, max_restarts=engine_restarts)
        lm = scheduler.lm  # tokenizer and adapter checks over the model on the meta device
    else:
        lm = PrefixLM.load(spec.model, store=spec.store, device=spec.device, dtype=spec.dtype, force=spec.force,
                           compile=spec.compile, quantize=spec.quantize, max_batch=spec.max_batch)
        scheduler = Scheduler(lm, max_batch=spec.max_batch, max_queue=spec.max_queue, mode=spec.mode,
                              max_model_len=spec.max_model_len, start=False,
                              max_inflight_tokens=spec.max_inflight_tokens, max_step_tokens=spec.max_step_tokens)
    limit = model_limit(lm.model)
    if spec.max_model_len is not None and limit is not None and spec.max_model_len > limit:
        scheduler.shutdown(timeout=0.0, drain=False)
        raise typer.BadParameter(f"{spec.max_model_len} > the model's position limit {limit}",
                                 param_hint="--max-model-len")
    settings.max_model_len = scheduler.max_model_len = spec.max_model_len or limit
    try:
        serve(lm, scheduler, settings, log_level=log_level)
    except OSError as err:
        scheduler.shutdown(timeout=0.0, drain=False)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if getattr(scheduler, "failed", False):  # for an orchestrator: this server cannot serve any more
        typer.echo(f"error: {scheduler.reason}", err=True)
        raise typer.Exit(1)
