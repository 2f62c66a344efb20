"""`prefixtune bench`: every benchmark prints its ratio against a baseline measured in the same run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prefixtune.fileio import atomic_write, atomic_write_text


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["#2b8cbe", "#bdbdbd", "#fdae6b", "#a1d99b"][: len(values)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylim(0, max(values) * 1.15 if values else 1)  # room for the labels above the bars
    ax.set_ylabel(unit)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def bench_training(loaded, data, out: Path, steps: int, rows: int, console: Console) -> dict[str, Any]:
    from prefixtune.bench import train_speed

    results = train_speed.run(loaded, data, steps=steps, rows=rows, say=console.print)
    ours, peer = results
    table = Table(title=f"training: {rows} emotion rows, batch 8, {steps} steps, label in the prompt")
    for col in ("method", "real tokens/s", "seconds", "eval loss"):
        table.add_column(col)
    for r in results:
        table.add_row(r.method, f"{r.tokens_per_s:.1f}", f"{r.seconds:.1f}", f"{r.eval_loss:.3f}")
    console.print(table)
    ratio = ours.tokens_per_s / max(peer.tokens_per_s, 1e-9)
    console.print(f"prefixtune trains {ratio:.2f}x the peer recipe's real tokens/s "
                  f"(eval loss {ours.eval_loss:.3f} vs {peer.eval_loss:.3f})")
    bar_chart(out / "train_tokens_per_s.png", "training speed (real tokens/s)",
              [r.method for r in results], [r.tokens_per_s for r in results], "real tokens/s")
    return {"results": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results], "speedup": ratio}


def bench_serving(loaded, out: Path, console: Console) -> dict[str, Any]:
    from prefixtune.bench import serve_speed

    r = serve_speed.run(loaded, say=console.print)
    speeds = {k: v for k, v in r.items() if not k.endswith(("ms", "speedup"))}
    table = Table(title="serving 6 adapters, 24 requests (16-32 new tokens), one base model")
    table.add_column("method")
    table.add_column("generated tokens/s")
    table.add_column("x peft grouped")
    for name, value in speeds.items():
        table.add_row(name, f"{value:.1f}", f"{value / r['peft grouped']:.2f}")
    console.print(table)
    console.print(f"continuous mixed batching: {r['prefixtune continuous'] / r['prefixtune grouped']:.2f}x "
                  f"grouping by adapter; adapter swap {r['adapter swap ms']:.2f} ms = "
                  f"{r['base reload ms'] / max(r['adapter swap ms'], 1e-6):.0f}x faster than reloading the base")
    console.print(f"n>1 choices sharing their prompt's prefill: {r['n>1 shared prefill speedup']:.2f}x "
                  "prefilling it once per choice (same run)")
    bar_chart(out / "serve_tokens_per_s.png", "serving speed (generated tokens/s)", list(speeds),
              list(speeds.values()), "tokens/s")
    return r


def bench_end_to_end(model: str, data: str, out: Path, rows: int, console: Console) -> dict[str, Any]:
    from prefixtune.bench import train_e2e

    r = train_e2e.run(model, data, out / "e2e", rows=rows, eval_rows=rows, say=console.print)
    table = Table(title=f"whole `train` command: {rows} rows, 1 epoch, batch 8, final eval on {rows} rows, save")
    for col in ("method", "wall seconds", "CPU seconds", "eval loss (same scorer)"):
        table.add_column(col)
    for name, key in (("prefixtune train", "ours"), ("peft+trainer (pad 128)", "peer")):
        table.add_row(name, f"{r[key + '_seconds']:.1f}", f"{r[key + '_cpu_seconds']:.1f}",
                      f"{r[key + '_eval_loss']:.3f}")
    console.print(table)
    console.print(f"end to end, prefixtune train is {r['ratio']:.2f}x faster than the peer recipe in wall time, "
                  f"{r['cpu_ratio']:.2f}x in CPU time (eval loss {r['ours_eval_loss']:.3f} vs "
                  f"{r['peer_eval_loss']:.3f}); on a shared machine trust the CPU-time ratio")
    bar_chart(out / "train_e2e_seconds.png", "whole training command (s, lower is better)",
              ["prefixtune train", "peft+trainer"], [r["ours_seconds"], r["peer_seconds"]], "seconds")
    return r


def run_bench(model: str, data: str, out: str, steps: int = 10, rows: int = 256,
              sections: tuple[str, ...] = ("train", "serve")) -> dict[str, Any]:
    from prefixtune.data import load_data
    from prefixtune.models import load_base_model

    console = Console()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": model, "data": data}
    bundle = load_data(data) if "train" in sections else None
    if "train" in sections:
        report["train"] = bench_training(load_base_model(model), bundle, out_dir, steps, rows, console)
    if "e2e" in sections:
        report["e2e"] = bench_end_to_end(model, data, out_dir, rows, console)
    if "serve" in sections:
        report["serve"] = bench_serving(load_base_model(model), out_dir, console)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2, default=str))
    console.print(f"results in {out_dir}")
    return report
