"""`prefixtune bench`: speed and memory against baselines measured in the same run; `bench task`: quality on a task;
`bench serve --http`: a load generator against a real `prefixtune serve` process."""

from __future__ import annotations

from typing import Optional

import typer

from prefixtune.cli.common import parse_csv, user_errors
from prefixtune.engine.policy import STEP_TOKENS


def _save_report(report: dict, out: str, name: str) -> None:
    """OUT/NAME as indented JSON (atomically), and where it went."""
    import json
    from pathlib import Path

    from prefixtune.fileio import atomic_write_text

    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / name, json.dumps(report, indent=2, default=str))
    typer.echo(f"results in {out}/{name}")


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Benchmarks against baselines measured in the same run.", no_args_is_help=False)

    @bench_app.callback(invoke_without_command=True)
    @user_errors
    def bench(
        ctx: typer.Context,
        model: str = typer.Option("smollm2-135m", help="Base model."),
        data: str = typer.Option("dair-ai/emotion", help="Emotion data (hub id or local folder)."),
        out: str = typer.Option("runs/bench", help="Where results.json and the PNG charts go."),
        steps: int = typer.Option(10, help="Training steps per method."),
        rows: int = typer.Option(256, help="Training rows."),
        sections: str = typer.Option("train,serve", help="Comma-separated: train (steps), e2e (whole "
                                                                 "train command vs the peer script), serve."),
    ) -> None:
        """Benchmarks that print ratios against a baseline measured in the same run (`bench task`: task quality)."""
        if ctx.invoked_subcommand is not None:
            return
        from prefixtune.bench.run import run_bench

        run_bench(model, data, out, steps, rows, tuple(parse_csv(sections) or ["train", "serve"]))

    @bench_app.command("task")
    @user_errors
    def bench_task(
        model: Optional[str] = typer.Option(None, help="Base model (default smollm2-135m)."),
        data: Optional[str] = typer.Option(None, help="Task data folder (default ../shared/data/e2e)."),
        out: Optional[str] = typer.Option(None, help="Results folder (default runs/bench/task)."),
        template: Optional[str] = typer.Option(None, help="Template over the input fields."),
        target_field: Optional[str] = typer.Option(None, help="Field holding the target text."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps for both trainers (default 120)."),
        batch_size: Optional[int] = typer.Option(None, help="Rows per step (default 8)."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate for both (default 2e-3)."),
        num_virtual_tokens: Optional[int] = typer.Option(None, help="Prefix length (default 20)."),
        max_length: Optional[int] = typer.Option(None, help="Tokens per training row (default 128)."),
        items: Optional[int] = typer.Option(None, help="Distinct test inputs scored (default 100)."),
        num_beams: Optional[int] = typer.Option(None, help="Beam width of the beam pass (default 4)."),
        seed: Optional[int] = typer.Option(None, help="Seed (default 0)."),
        max_examples: Optional[int] = typer.Option(None, help="Training rows drawn from train (default all)."),
    ) -> None:
        """Task quality: prefixtune's prefix vs a PEFT prefix trained the same way vs the base model (BLEU, chrF,
        ROUGE-L on test inputs, greedy and beam)."""
        from prefixtune.bench.task import TaskBenchConfig, run_task_bench

        flags = {k: v for k, v in dict(locals()).items() if v is not None and k not in ("TaskBenchConfig",
                                                                                        "run_task_bench")}
        run_task_bench(TaskBenchConfig(**flags))

    @bench_app.command("serve")
    @user_errors
    def serve(
        http: bool = typer.Option(False, "--http", help="Load a real `prefixtune serve` process over HTTP."),
        model: str = typer.Option("smollm2-135m", "--model", help="Base model."),
        tiny: bool = typer.Option(False, "--tiny", help="A tiny random Llama instead (shows the engine's own costs)."),
        concurrency: str = typer.Option("1,8,32", "--concurrency", help="Comma-separated client concurrencies."),
        requests: int = typer.Option(32, "--requests", min=1, help="Requests per concurrency level (at least 2x it)."),
        max_tokens: int = typer.Option(16, "--max-tokens", min=1, help="Tokens per request."),
        adapters: int = typer.Option(500, "--adapters", min=7, help="Adapters in the large store (vs 6)."),
        repeats: int = typer.Option(2, "--repeats", min=1, help="Alternating runs per scenario (best counts)."),
        peft: bool = typer.Option(False, "--peft", help="Also PEFT's set_adapter + generate per adapter group."),
        ray: bool = typer.Option(False, "--ray", help="1 vs 2 Ray Serve replicas on this machine, over HTTP."),
        out: str = typer.Option("runs/bench-serve", "--out", help="Where results.json goes."),
    ) -> None:
        """Serving benchmarks; with --http, a load generator against the real server at several concurrencies."""
        if not (http or ray):
            from prefixtune.bench.run import run_bench

            run_bench(model, "", out, sections=("serve",))
            return
        levels = tuple(int(c) for c in parse_csv(concurrency) or ["1", "8", "32"])
        if any(c < 1 for c in levels):
            raise typer.BadParameter("concurrencies must be >= 1", param_hint="--concurrency")
        if ray:
            from prefixtune.bench.serve_ray import run_ray_bench

            report = run_ray_bench(model, tiny, levels, requests, max_tokens, repeats, say=typer.echo)
        else:
            from prefixtune.bench.serve_http import run_http

            report = run_http(model, tiny, levels, requests, max_tokens, adapters, repeats, peft, say=typer.echo)
        _save_report(report, out, "results.json")

    @bench_app.command("prefill")
    @user_errors
    def bench_prefill(
        model: str = typer.Option("smollm2-135m", "--model", help="Base model."),
        tiny: bool = typer.Option(False, "--tiny", help="A tiny random Llama instead."),
        budgets: str = typer.Option(f"0,16,{STEP_TOKENS['cpu']},32,64", "--budgets",
                                    help="Comma-separated --max-step-tokens values to compare (0 = prompts join whole)."),
        streams: int = typer.Option(8, "--streams", min=1, help="Streams decoding when the long prompt joins."),
        prompt_tokens: int = typer.Option(1500, "--prompt-tokens", min=1, help="Tokens of the joining prompt."),
        repeats: int = typer.Option(1, "--repeats", min=1, help="Joins per setting (the least disturbed counts)."),
        out: str = typer.Option("runs/bench-prefill", "--out", help="Where prefill.json goes."),
    ) -> None:
        """Chunked prefill: the running streams' inter-token gaps while a long prompt joins, per step budget."""
        from prefixtune.bench.chunked_prefill import run_prefill_bench, save

        values = [int(b) for b in parse_csv(budgets) or ["0"]]
        report = run_prefill_bench(model, tiny, values, streams, prompt_tokens, repeats=repeats, say=typer.echo)
        save(report, out)
        typer.echo(f"results in {out}/prefill.json")

    @bench_app.command("engine")
    @user_errors
    def bench_engine(
        model: str = typer.Option("tiny", "--model", help="tiny (a random 2-layer llama) or a base model."),
        batches: str = typer.Option("1,16,32", "--batches", help="Comma-separated decode batch sizes."),
        new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="Tokens generated per row."),
        prefill_tokens: int = typer.Option(128, "--prefill-tokens", min=2, help="Prompt tokens per row (prefill)."),
        prefix_lengths: str = typer.Option("0,10,20,50,100", "--prefix-lengths",
                                           help="Comma-separated virtual tokens per row (prefix overhead)."),
        repeats: int = typer.Option(2, "--repeats", min=1, help="Alternating runs per pair (best counts)."),
        compile: bool = typer.Option(True, "--compile/--no-compile", help="Measure the compiled decode step."),
        quantize: bool = typer.Option(True, "--quantize/--no-quantize", help="Measure --quantize int8 and fp16 at batch 1 and the largest batch."),
        force_bf16: bool = typer.Option(False, "--force-bf16", help="Measure bf16 even without native bf16."),
        served: bool = typer.Option(True, "--served/--no-served", help="Also the engine in its own process."),
        out: str = typer.Option("runs/bench-engine", "--out", help="Where engine.json goes."),
    ) -> None:
        """The engine vs a bare transformers loop, eager vs compiled, float32 vs bf16 vs int8/fp16, prefill, and the
        prefix overhead, as ratios measured in one run."""
        from prefixtune.bench.engine import EngineBenchConfig, run_engine_bench

        def ints(text: str, flag: str) -> tuple[int, ...]:
            try:
                values = tuple(int(v) for v in parse_csv(text) or [])
            except ValueError:
                values = ()
            if not values or any(v < 0 for v in values):
                raise typer.BadParameter("comma-separated integers >= 0", param_hint=flag)
            return values

        cfg = EngineBenchConfig(model, ints(batches, "--batches"), new_tokens, prefill_tokens,
                                ints(prefix_lengths, "--prefix-lengths"), repeats, compile, quantize, force_bf16, served)
        if min(cfg.batches) < 1:
            raise typer.BadParameter("batch sizes must be >= 1", param_hint="--batches")
        report = run_engine_bench(cfg, say=typer.echo)
        _save_report(report, out, "engine.json")

    @bench_app.command("soak")
    @user_errors
    def bench_soak(
        minutes: float = typer.Option(1.0, "--minutes", min=0.1, help="How long the mixed traffic runs."),
        out: str = typer.Option("runs/bench-soak", "--out", help="Where soak.json goes."),
    ) -> None:
        """The real server (tiny model) under mixed traffic, hang-ups, cancels, admin loads and 429 bursts;
        requests by outcome, latency and memory per minute, and no row or request left at the end."""
        from prefixtune.bench.soak import run_soak

        report = run_soak(minutes, say=typer.echo)
        _save_report(report, out, "soak.json")
        if report["5xx"] or report["running"] or report["waiting"]:
            raise typer.Exit(1)

    app.add_typer(bench_app, name="bench")
