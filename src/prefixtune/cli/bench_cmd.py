"""`prefixtune bench`: speed and memory against baselines measured in the same run."""

from __future__ import annotations

import typer

from prefixtune.cli.common import parse_csv, user_errors


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @user_errors
    def bench(
        model: str = typer.Option("smollm2-135m", help="Base model."),
        data: str = typer.Option("dair-ai/emotion", help="Emotion data (hub id or local folder)."),
        out: str = typer.Option("runs/bench", help="Where results.json and the PNG charts go."),
        steps: int = typer.Option(10, help="Training steps per method."),
        rows: int = typer.Option(256, help="Training rows."),
        sections: str = typer.Option("train,serve", help="Comma-separated: train (steps), e2e (whole "
                                                                 "train command vs the peer script), serve."),
    ) -> None:
        """Benchmarks that print ratios against a baseline measured in the same run."""
        from prefixtune.bench.run import run_bench

        run_bench(model, data, out, steps, rows, tuple(parse_csv(sections) or ["train", "serve"]))
