"""`prefixtune serve` (placeholder until its issue lands)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def _cmd() -> None:
        """Serve the base model and every adapter over an OpenAI-compatible API (not built yet)."""
        typer.echo("serve: not built yet")
        raise typer.Exit(1)
