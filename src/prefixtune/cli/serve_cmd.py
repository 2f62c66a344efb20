"""`prefixtune serve`: the base model and every adapter of a store behind an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prefixtune.cli.common import user_errors
from prefixtune.engine.policy import step_tokens as check_step_tokens


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @user_errors
    def _cmd(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Base model: alias, local folder or .gguf."),
        store: Optional[Path] = typer.Option(None, "--store", help="Adapter store folder (default: ~/.cache/prefixtune/adapters)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
        port: int = typer.Option(8000, "--port", help="Port (0 = any free port)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PREFIXTUNE_API_KEY",
                                              help="Require `Authorization: Bearer KEY` on every endpoint but /health."),
        max_batch: int = typer.Option(16, "--max-batch", min=1, help="Rows decoded together."),
        max_queue: int = typer.Option(256, "--max-queue", min=1, help="Waiting requests before new ones get HTTP 429."),
        max_step_tokens: str = typer.Option("auto", "--max-step-tokens",
                                            help="Tokens per engine step: one per decoding row plus prompt tokens of "
                                                 "joining requests (chunked prefill). auto: 24 on CPU, 2048 on CUDA; "
                                                 "0: prompts join whole."),
        max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1,
                                                    help="Virtual + prompt + new tokens per row (default: the model's limit)."),
        max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Cap on max_tokens per choice."),
        max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", min=1,
                                                        help="Tokens per prompt (default: --max-model-len)."),
        max_n: int = typer.Option(16, "--max-n", min=1, help="Choices per prompt (n)."),
        max_num_beams: int = typer.Option(8, "--max-num-beams", min=1,
                                          help="Beams per prompt (extension field num_beams; each is a batch row)."),
        max_stop_chars: int = typer.Option(256, "--max-stop-chars", min=1, help="Characters per stop string."),
        max_compose: int = typer.Option(4, "--max-compose", min=2, help="Adapters in one composed model \"a+b\" "
                                                                        "(each part and negative is a batch row)."),
        max_inflight_tokens: int = typer.Option(1 << 19, "--max-inflight-tokens", min=1,
                                                help="Prompt + max_tokens summed over in-flight rows (beyond: 429)."),
        mode: str = typer.Option("continuous", "--batching", help="continuous (rows join/leave every step) or grouped."),
        admin: bool = typer.Option(True, "--admin/--no-admin", help="Enable POST/DELETE /v1/adapters."),
        docs: bool = typer.Option(True, "--docs/--no-docs", help="Serve the API's description: /openapi.json and /docs."),
        adapter_root: Optional[list[Path]] = typer.Option(None, "--adapter-root",
                                                          help="Folder POST /v1/adapters may load adapters from by path (repeatable)."),
        max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="Larger request bodies get 413."),
        served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                        help="Base model id in the API (default: --model)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16."),
        compile: bool = typer.Option(False, "--compile/--no-compile",
                                     help="Compile the decode step (torch.compile), warmed up at start."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="fp16 | int8: quantized frozen base, CPU (fp16: no drift; int8: faster, drifts; docs/BENCHMARKS.md)."),
        shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout", min=0,
                                               help="Seconds in-flight requests get to finish on SIGTERM."),
        force: bool = typer.Option(False, "--force", help="Serve adapters trained on another base of the same shape."),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
        backend: str = typer.Option("local", "--backend", help="local (this machine) or ray (Ray Serve replicas)."),
        engine_process: bool = typer.Option(True, "--engine-process/--no-engine-process",
                                            help="local: run the model in its own process (HTTP and text off its GIL)."),
        engine_restarts: int = typer.Option(3, "--engine-restarts", min=0,
                                            help="local: restarts of a dead engine process within 5 minutes; one more "
                                                 "death and the server exits with status 1."),
        replicas: int = typer.Option(1, "--replicas", min=1, help="ray: engine replicas (one per GPU)."),
        max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1,
                                                   help="ray: autoscale from --replicas up to this many."),
        max_adapters: int = typer.Option(8, "--max-adapters-per-replica", min=1,
                                         help="ray: adapters a replica keeps loaded (LRU; requests go where theirs is)."),
        address: Optional[str] = typer.Option(None, "--address",
                                              help="ray: ray://HEAD:10001 or auto (this node's cluster); default: start one here."),
        replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0, help="ray: CPUs reserved per replica."),
        replica_gpus: Optional[float] = typer.Option(None, "--replica-gpus", min=0,
                                                     help="ray: GPUs per replica (default: 1 with CUDA, else 0)."),
        preload: Optional[list[str]] = typer.Option(None, "--preload", help="ray: adapter every replica loads at start (repeatable)."),
        pin: Optional[list[str]] = typer.Option(None, "--pin", help="ray: adapter held by every replica, never evicted (repeatable)."),
    ) -> None:
        """Serve the base model and every adapter over an OpenAI-compatible API (model = adapter name)."""
        from prefixtune.engine.lm import PrefixLM
        from prefixtune.engine.scheduler import MODES, Scheduler
        from prefixtune.server.app import ServerSettings, model_limit
        from prefixtune.server.runner import serve

        if mode not in MODES:
            raise typer.BadParameter(f"choose one of {', '.join(MODES)}", param_hint="--batching")
        try:
            step_tokens = max_step_tokens if max_step_tokens == "auto" else int(max_step_tokens)
            check_step_tokens(step_tokens, "cpu")
        except ValueError:
            raise typer.BadParameter("an integer >= 2, 0 (prompts join whole) or auto",
                                     param_hint="--max-step-tokens") from None
        step_tokens = step_tokens or None
        ray_flags = {"--replicas": replicas != 1, "--max-replicas": max_replicas is not None,
                     "--max-adapters-per-replica": max_adapters != 8, "--address": address is not None,
                     "--replica-cpus": replica_cpus != 1.0, "--replica-gpus": replica_gpus is not None,
                     "--preload": bool(preload), "--pin": bool(pin)}
        from prefixtune.quantize import check_quantize

        quantize = check_quantize(quantize)
        if backend not in ("local", "ray"):
            raise typer.BadParameter("choose local or ray", param_hint="--backend")
        if backend == "local" and any(ray_flags.values()):
            flag = next(f for f, given in ray_flags.items() if given)
            raise typer.BadParameter(f"{flag} needs --backend ray", param_hint=flag)
        # A folder or .gguf path makes an awkward model id; its last component is what people type.
        default_id = Path(model).name if ("/" in model or model.lower().endswith(".gguf")) else model
        settings = ServerSettings(
            model_name=served_model_name or default_id, host=host, port=port, api_key=api_key or None, admin=admin,
            adapter_roots=list(adapter_root or []), max_body_bytes=max_body_bytes, max_model_len=max_model_len,
            max_tokens=max_tokens, shutdown_timeout=shutdown_timeout, max_prompt_tokens=max_prompt_tokens,
            max_n=max_n, max_stop_chars=max_stop_chars, max_num_beams=max_num_beams, docs=docs,
            max_compose=max_compose,
        )
        if backend == "ray":
            if compile or quantize:
                raise typer.BadParameter("--compile and --quantize serve the local backend; drop them for --backend ray",
                                         param_hint="--compile" if compile else "--quantize")
            from prefixtune.cli.serve_ray import run_ray

            engine = dict(model=model, store=str(store) if store else None, device=device, dtype=dtype, force=force,
                          max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len,
                          max_inflight_tokens=max_inflight_tokens, mode=mode, max_adapters=max_adapters,
                          max_step_tokens=step_tokens,
                          preload=list(preload or []), pin=list(pin or []))
            placement = dict(replicas=replicas, max_replicas=max_replicas, address=address,
                             replica_cpus=replica_cpus, replica_gpus=replica_gpus)
            run_ray(settings, engine, placement)
            return
        if engine_process:
            from prefixtune.engine.client import EngineSpec
            from prefixtune.engine.supervisor import SupervisedEngine

            scheduler = SupervisedEngine(EngineSpec(model, str(store) if store else None, device, dtype, force,
                                                    max_batch, max_queue, mode, max_model_len, max_inflight_tokens,
                                                    step_tokens, compile=compile, quantize=quantize),
                                         max_restarts=engine_restarts)
            lm = scheduler.lm  # tokenizer and adapter checks over the model on the meta device
        else:
            lm = PrefixLM.load(model, store=store, device=device, dtype=dtype, force=force, compile=compile,
                               quantize=quantize, max_batch=max_batch)
            scheduler = Scheduler(lm, max_batch=max_batch, max_queue=max_queue, mode=mode, max_model_len=max_model_len,
                                  start=False, max_inflight_tokens=max_inflight_tokens, max_step_tokens=step_tokens)
        limit = model_limit(lm.model)
        if max_model_len is not None and limit is not None and max_model_len > limit:
            scheduler.shutdown(timeout=0.0, drain=False)
            raise typer.BadParameter(f"{max_model_len} > the model's position limit {limit}",
                                     param_hint="--max-model-len")
        settings.max_model_len = scheduler.max_model_len = max_model_len or limit
        try:
            serve(lm, scheduler, settings, log_level=log_level)
        except OSError as err:
            scheduler.shutdown(timeout=0.0, drain=False)
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        if getattr(scheduler, "failed", False):  # for an orchestrator: this server cannot serve any more
            typer.echo(f"error: {scheduler.reason}", err=True)
            raise typer.Exit(1)
