"""`prefixtune eval --sweep`: the samples' figures over a grid of temperature x top-p.

Clients sample at temperature 0.7-1.0 with top-p 0.9-1.0, not only at T 1, so each cell draws the same seeded
samples with the guidance the adapters recommend (or the caller's) and reports accuracy, the worst label,
distinct-2, length and the degenerate share, each against the control-quality bar.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from prefixtune.errors import UserError
from prefixtune.eval.evaluate import EvalSettings, Method, generate_samples
from prefixtune.eval.quality import MAX_DEGENERATE, MIN_DISTINCT_2, judged_stats
from prefixtune.eval.report import fmt, markdown_table

SWEEP_TEMPERATURES = [0.7, 0.8, 0.9, 1.0]  # what clients commonly send
SWEEP_TOP_PS = [0.9, 0.95, 1.0]
MIN_ACCURACY = 0.80  # the bar a cell must clear, beside quality's distinct-2 and degenerate bars
MIN_WORST_LABEL = 0.60

# (key, title, format, passes) per panel of the plot and column of the table.
_METRICS = [
    ("accuracy", "conditioning accuracy", "{:.2f}", lambda v: v >= MIN_ACCURACY),
    ("worst_label", "worst label", "{:.2f}", lambda v: v >= MIN_WORST_LABEL),
    ("distinct_2", "distinct-2", "{:.2f}", lambda v: v >= MIN_DISTINCT_2),
    ("mean_words", "mean words", "{:.1f}", None),
    ("degenerate", "degenerate share", "{:.1%}", lambda v: v <= MAX_DEGENERATE),
]


def check_grid(temperatures: list[float], top_ps: list[float]) -> None:
    """Refuse a grid the sampler would refuse, before any model loads."""
    if not temperatures or not top_ps:
        raise UserError("--sweep-temperatures and --sweep-top-ps need at least one value each")
    if bad := [t for t in temperatures if not 0 < t < float("inf")]:
        raise UserError(f"--sweep-temperatures {bad}: each must be > 0 (the sweep samples; greedy has no grid)")
    if bad := [p for p in top_ps if not 0 < p <= 1]:
        raise UserError(f"--sweep-top-ps {bad}: each must be in (0, 1]")


def meets(row: dict[str, Any]) -> bool | None:
    """Whether a cell clears every bar (None without a judge: accuracy unknown)."""
    if row.get("accuracy") is None:
        return None
    return all(check(row[key]) for key, _, _, check in _METRICS if check is not None)


def sampling_sweep(lm, method: Method, settings: EvalSettings, judge, temperatures: list[float],
                   top_ps: list[float], say=print) -> list[dict[str, Any]]:
    """One row per (temperature, top-p): the same seeds in every cell, so only the sampling settings differ."""
    rows = []
    for temperature in temperatures:
        for top_p in top_ps:
            cell = replace(settings, temperature=temperature, top_p=top_p, progress=False)
            samples = generate_samples(lm, method, cell)
            row = {"temperature": temperature, "top_p": top_p, **judged_stats(samples, judge, method.labels)}
            row["meets"] = meets(row)
            row["examples"] = {s["label"]: s["text"] for s in samples[:: max(1, settings.samples_per_label)]}
            rows.append(row)
            say(f"{method.name}: T {temperature:g}, top-p {top_p:g}: accuracy {fmt(row['accuracy'], '{:.3f}')} "
                f"(worst {fmt(row.get('worst_label'), '{:.2f}')}), {row['mean_words']:.1f} words, distinct-2 "
                f"{row['distinct_2']:.3f}, degenerate {row['degenerate']:.1%}")
    return rows


def sweep_markdown(rows: list[dict[str, Any]], samples: int, png: str = "sampling_sweep.png") -> str:
    """The sweep as a markdown section: one row per cell, the bar it is held to, and the plot."""
    table = markdown_table(
        ["temperature", "top-p"] + [title for _, title, _, _ in _METRICS] + ["meets the bar"],
        [[f"{r['temperature']:g}", f"{r['top_p']:g}"] + [fmt(r.get(key), spec) for key, _, spec, _ in _METRICS]
         + [{True: "yes", False: "**no**", None: "n/a"}[r["meets"]]] for r in rows])
    return "\n".join([
        "", "## Sampling sweep: temperature x top-p", "",
        f"{samples} samples per cell (the same seeds in every cell), each with the default guidance. The bar: "
        f"accuracy >= {MIN_ACCURACY:.2f}, every label >= {MIN_WORST_LABEL:.2f}, distinct-2 >= {MIN_DISTINCT_2:.2f}, "
        f"degenerate <= {MAX_DEGENERATE:.0%}.", "", table, "", f"![sampling sweep]({png})", ""])


def plot_sampling_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One heat map per metric (temperature down, top-p across), each cell's value written in; a cell under
    its bar is drawn in red."""
    from prefixtune.eval.report import _plt, _save

    plt = _plt()
    temps = sorted({r["temperature"] for r in rows})
    tops = sorted({r["top_p"] for r in rows})
    cell = {(r["temperature"], r["top_p"]): r for r in rows}
    fig, axes = plt.subplots(1, len(_METRICS), figsize=(3.0 * len(_METRICS), 0.55 * len(temps) + 1.9))
    for ax, (key, name, spec, check) in zip(axes, _METRICS):
        grid = [[cell[(t, p)].get(key) if (t, p) in cell else None for p in tops] for t in temps]
        values = [[float("nan") if v is None else v for v in line] for line in grid]
        ax.imshow(values, cmap="Greys", vmin=0, vmax=max(1.0, max((v for line in values for v in line
                                                                    if v == v), default=1.0)) * 1.6)
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                bad = value is not None and check is not None and not check(value)
                ax.text(j, i, fmt(value, spec), ha="center", va="center", fontsize=8,
                        color="tab:red" if bad else "black", fontweight="bold" if bad else "normal")
        ax.set_xticks(range(len(tops)), [f"{p:g}" for p in tops])
        ax.set_yticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_xlabel("top-p", fontsize=8)
        ax.set_ylabel("temperature", fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title} (red: under the bar)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
