"""`prefixtune adapters ...` (placeholder until the adapter-library issue lands)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_adapters() -> None:
    """List adapters in the store (not built yet)."""
    typer.echo("adapters: not built yet")
