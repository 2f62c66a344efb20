"""`prefixtune bench`: speed and memory against baselines measured in the same run.

`prefixtune bench` runs the training and in-process serving benchmarks; `prefixtune bench serve --http` loads
a real server process over HTTP from this one.
"""

from __future__ import annotations

import typer

from prefixtune.cli.common import parse_csv, user_errors


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Benchmarks that print ratios against a baseline measured in the same run.",
                            invoke_without_command=True, no_args_is_help=False)
    app.add_typer(bench_app, name="bench")

    @bench_app.callback()
    @user_errors
    def bench(
        ctx: typer.Context,
        model: str = typer.Option("smollm2-135m", help="Base model."),
        data: str = typer.Option("dair-ai/emotion", help="Emotion data (hub id or local folder)."),
        out: str = typer.Option("runs/bench", help="Where results.json and the PNG charts go."),
        steps: int = typer.Option(10, help="Training steps per method."),
        rows: int = typer.Option(256, help="Training rows."),
        sections: str = typer.Option("train,serve", help="Comma-separated: train, serve."),
    ) -> None:
        """Training and serving benchmarks (in process); `bench serve --http` for the HTTP load test."""
        if ctx.invoked_subcommand is not None:
            return
        from prefixtune.bench.run import run_bench

        run_bench(model, data, out, steps, rows, tuple(parse_csv(sections) or ["train", "serve"]))

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
        out: str = typer.Option("runs/bench-serve", "--out", help="Where results.json goes."),
    ) -> None:
        """Serving benchmarks; with --http, a load generator against the real server at several concurrencies."""
        import json
        from pathlib import Path

        from prefixtune.prefix.peft_io import atomic_write_text

        if not http:
            from prefixtune.bench.run import run_bench

            run_bench(model, "", out, sections=("serve",))
            return
        from prefixtune.bench.serve_http import run_http

        levels = tuple(int(c) for c in parse_csv(concurrency) or ["1", "8", "32"])
        if any(c < 1 for c in levels):
            raise typer.BadParameter("concurrencies must be >= 1", param_hint="--concurrency")
        report = run_http(model, tiny, levels, requests, max_tokens, adapters, repeats, peft, say=typer.echo)
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "results.json", json.dumps(report, indent=2, default=str))
        typer.echo(f"results in {out}/results.json")
