"""`prefixtune eval` and `prefixtune compare` (placeholders until the evaluation issue lands)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def _eval() -> None:
        """Evaluate an adapter: loss, perplexity, conditioning accuracy (not built yet)."""
        typer.echo("eval: not built yet")
        raise typer.Exit(1)

    @app.command("compare")
    def _compare() -> None:
        """Compare prefix tuning, LoRA and prompting on the same data (not built yet)."""
        typer.echo("compare: not built yet")
        raise typer.Exit(1)
