"""`prefixtune bench` (placeholder until its issue lands)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def _cmd() -> None:
        """Benchmarks against a baseline measured in the same run (not built yet)."""
        typer.echo("bench: not built yet")
        raise typer.Exit(1)
