"""`prefixtune generate` (placeholder until its issue lands)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def _cmd() -> None:
        """Generate text with one or more adapters (not built yet)."""
        typer.echo("generate: not built yet")
        raise typer.Exit(1)
