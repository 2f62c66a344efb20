"""What a run leaves for people: the log as JSON lines, a loss-curve PNG and a summary."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from prefixtune.errors import UserError
from prefixtune.fileio import atomic_write, atomic_write_text, write_failure


class LogWriteError(UserError, OSError):
    """The training log could not be written (a full or read-only disk); the previous log is kept whole."""


def write_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    path = run_dir / "train_log.jsonl"
    try:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))
    except OSError as err:
        raise LogWriteError(write_failure(err, f"write the training log {path}")) from None


def preload_plotting() -> None:
    """Import matplotlib (and build its font list) in a background thread while training runs: the import
    costs 1-5 s on a CPU, and torch's kernels release the GIL, so overlapped it is nearly free."""
    import threading

    def load() -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
            from matplotlib.font_manager import fontManager  # noqa: F401
        except Exception:  # noqa: BLE001 - plot_losses will report it where it matters
            pass

    threading.Thread(target=load, name="preload-matplotlib", daemon=True).start()


def plot_losses(history: list[dict[str, Any]], path: Path, title: str = "prefixtune training") -> Path | None:
    """Train loss per step and eval loss per eval, one PNG."""
    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no backend machinery or global figure state to load

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train loss", alpha=0.35)
        ax.plot(steps, _ema(losses), label="train loss (EMA 0.9)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def _ema(values, decay: float = 0.9) -> list[float]:
    """Per-step losses jump with batch content; the smoothed line shows the trend."""
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def start_memory_window(device: torch.device) -> float | None:
    """Reset the peak to what is resident now, so the peak read at the end is training's own (not model loading's
    transient copies); returns that starting point in MB, or None where the peak cannot be reset.

    CUDA: the allocator's peak. Linux: writing 5 to /proc/self/clear_refs resets the process's high-water mark
    (VmHWM, which getrusage's ru_maxrss reports too) to its current resident set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux, or not allowed: the peak stays the process's whole-life peak
        return None
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["training summary"]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:,.4g}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        lines.append(f"  {key:<24} {value}")
    return "\n".join(lines)
