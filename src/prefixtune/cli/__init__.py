"""The `prefixtune` command line: one typer app, one small module per command group."""

from __future__ import annotations

import typer

from prefixtune.cli import adapters_cmd, bench_cmd, eval_cmd, generate_cmd, serve_cmd, train_cmd

app = typer.Typer(
    name="prefixtune",
    help="Prefix tuning for causal LMs: train, store, generate with and serve many prefix adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

train_cmd.register(app)
app.add_typer(adapters_cmd.app, name="adapters", help="Manage the adapter library (list, show, rm, ...).")
generate_cmd.register(app)
serve_cmd.register(app)
eval_cmd.register(app)
bench_cmd.register(app)


@app.command()
def doctor() -> None:
    """Print versions, device, the bundled model's state and known-bad version combinations.

    Exits 1 when a check fails (warnings alone exit 0), so scripts and CI can rely on it.
    """
    from prefixtune.doctor import print_doctor

    failed = [check for check, _, status in print_doctor() if status == "fail"]
    if failed:
        typer.echo(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def main() -> None:
    app()
