"""`prefixtune adapters ...`: list, show, rm, rename, import and export adapters of a store.

Imports stay inside the commands: `prefixtune --help` must not pay for torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prefixtune.cli.common import user_errors

app = typer.Typer(no_args_is_help=True, help="Manage the adapter library (list, show, rm, rename, import, export).")

StoreOpt = typer.Option(None, "--store", help="Adapter store folder (default: $PREFIXTUNE_HOME/adapters).")


def _store(path: Optional[Path]):
    from prefixtune.store import AdapterStore, default_store

    return AdapterStore(path if path is not None else default_store())


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _metric_text(metric: tuple[str, float] | None) -> str:
    if metric is None:
        return "-"
    key, value = metric
    short = {"eval_loss_own": "loss", "eval_loss": "loss", "perplexity": "ppl"}.get(key, key)
    return f"{short} {value:.4g}"


@app.command("list")
@user_errors
def list_adapters(
    store: Optional[Path] = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List adapters: name, base model, virtual tokens, size on disk, created, key metric; damaged ones marked
    BROKEN with the reason below the table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from prefixtune.store import key_metric

    st = _store(store)
    items = st.list()
    if as_json:
        rows = []
        for a in items:
            m = a.manifest
            metric = key_metric(m)
            rows.append({
                "name": a.name, "base_model": m.base_model if m else None, "virtual_tokens": a.num_virtual_tokens,
                "size_bytes": a.size_bytes, "created": m.created if m else None,
                "metric": {metric[0]: metric[1]} if metric else None, "path": str(a.path),
                "broken": a.problem,  # why it cannot load, or null
            })
        typer.echo(json.dumps(rows, indent=2))
        return
    if not items:
        typer.echo(
            f"no adapters in {st.root}\n(train one with `prefixtune train --store {st.root}`, or bring one in "
            "with `prefixtune adapters import PATH --name NAME`)"
        )
        return
    # SIMPLE_HEAD: no vertical rules, so an 80-column terminal still has room for the base model.
    table = Table(title=f"adapters in {st.root}", title_justify="left", box=box.SIMPLE_HEAD)
    # Names are never cut (people copy them into --adapter); the base model folds instead.
    table.add_column("name", no_wrap=True, style="bold", min_width=max(len(a.name) for a in items))
    table.add_column("base model", overflow="fold", min_width=12)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("metric", overflow="fold", min_width=11)  # never cropped to "loss 3."
    for a in items:
        m = a.manifest
        table.add_row(
            a.name,
            m.base_model if m else "? (bare PEFT)",
            str(a.num_virtual_tokens) if a.num_virtual_tokens is not None else "?",
            human_size(a.size_bytes),
            (m.created or "-")[:10] if m else "-",  # the date; `adapters show` has the time
            "BROKEN" if a.problem else _metric_text(key_metric(m)),
        )
    Console(soft_wrap=False).print(table)
    for a in items:
        if a.problem:  # plain echo: the path in the reason must never be cropped by the table
            typer.echo(f"broken: {a.name}: {a.problem}")


@app.command("show")
@user_errors
def show(name: str = typer.Argument(..., help="Adapter name."), store: Optional[Path] = StoreOpt) -> None:
    """Print an adapter's full manifest (and its PEFT config) as JSON."""
    from prefixtune.prefix.peft_io import read_peft_config

    st = _store(store)
    info = st.info(name)
    out = {
        "name": info.name,
        "path": str(info.path),
        "size_bytes": info.size_bytes,
        "files": sorted(p.name for p in info.path.iterdir() if p.is_file()),
        "manifest": info.manifest.to_dict() if info.manifest else None,
        "broken": info.problem,
        "peft_config": read_peft_config(info.path),
    }
    typer.echo(json.dumps(out, indent=2, default=str))


@app.command("rm")
@user_errors
def rm(names: list[str] = typer.Argument(..., help="Adapter name(s)."), store: Optional[Path] = StoreOpt) -> None:
    """Remove adapters (each disappears in one atomic step)."""
    st = _store(store)
    for name in names:
        st.folder(name)  # every name must exist before anything is removed
    for name in names:
        st.remove(name)
        typer.echo(f"removed {name}")


@app.command("rename")
@user_errors
def rename(old: str = typer.Argument(..., help="Current name."), new: str = typer.Argument(..., help="New name."),
           store: Optional[Path] = StoreOpt) -> None:
    """Rename an adapter."""
    _store(store).rename(old, new)
    typer.echo(f"renamed {old} -> {new}")


@app.command("import")
@user_errors
def import_(
    path: Path = typer.Argument(..., help="A PEFT prefix-tuning folder (saved by peft) or a prefixtune adapter."),
    name: str = typer.Option(..., "--name", help="Name in the store."),
    model: str = typer.Option("smollm2-135m", "--model", help="Base model the adapter must fit."),
    store: Optional[Path] = StoreOpt,
    force: bool = typer.Option(False, "--force", help="Accept an adapter trained on another base model "
                                                      "(only when the shapes match)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an adapter of the same name."),
) -> None:
    """Copy an adapter into the store, checking its shapes against the base model."""
    from prefixtune.adapter_folder import validate_name
    from prefixtune.models import load_base_model
    from prefixtune.prefix.shapes import prefix_shape

    st = _store(store)
    validate_name(name)  # fail on a bad name before the (slow) model load
    if not path.is_dir():
        from prefixtune.adapter_folder import StoreError

        raise StoreError(f"{path} is not a folder; point import at a folder saved by peft's save_pretrained")
    # CPU/fp32 is enough: only the config (shapes) and the dtype-independent fingerprint are needed.
    loaded = load_base_model(model, device="cpu", dtype="float32")
    folder, warning = st.import_adapter(path, name, prefix_shape(loaded.model.config), loaded.name,
                                        loaded.fingerprint, force=force, overwrite=overwrite)
    if warning:
        typer.echo(warning, err=True)
    typer.echo(f"imported {path} as {name} -> {folder}")


@app.command("export")
@user_errors
def export(
    name: str = typer.Argument(..., help="Adapter name."),
    target: Path = typer.Argument(..., help="New folder to write (PEFT loads it with PeftModel.from_pretrained)."),
    store: Optional[Path] = StoreOpt,
    peft_only: bool = typer.Option(False, "--peft-only", help="Only PEFT's two files (drop our manifest and "
                                                              "trainable state)."),
) -> None:
    """Write a PEFT-loadable copy of an adapter."""
    out = _store(store).export(name, target, peft_only=peft_only)
    typer.echo(f"exported {name} -> {out}")


__all__ = ["app", "human_size"]
