"""What evaluations leave for people: JSON, markdown tables and PNGs (all written atomically)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefixtune.fileio import atomic_write, atomic_write_text

# (key in a compare row, column header, format) in table order.
COMPARE_COLUMNS: list[tuple[str, str, str]] = [
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("trainable_pct", "trainable %", "{:.3f}"),
    ("adapter_bytes", "adapter file (KB)", "kb"),
    ("peak_train_memory_mb", "peak train memory (MB)", "{:,.0f}"),
    ("train_memory_added_mb", "memory added by training (MB)", "{:,.0f}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("eval_loss", "eval loss", "{:.3f}"),
    ("conditioning_accuracy", "conditioning acc.", "{:.3f}"),
    ("latency_ms_per_token", "ms/token", "{:.2f}"),
    ("latency_overhead_pct", "overhead vs base", "{:+.1f}%"),
    ("prefix_length", "prefix length (tokens)", "{:.0f}"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _plt().close(fig)
    return path


def write_json(path: Path, data: Any) -> Path:
    # allow_nan=False would reject a NaN loss; None (null) is what a JSON reader can handle instead.
    atomic_write_text(path, json.dumps(_clean(data), indent=2, default=str) + "\n")
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if spec == "kb":
        return f"{value / 1024:,.1f}"
    return spec.format(value)


TRAINING_KEYS = ("trainable_params", "trainable_pct", "adapter_bytes", "adapter_kb", "peak_train_memory_mb",
                 "train_memory_added_mb", "train_seconds", "train_tokens_per_s")


def cell(row: dict[str, Any], key: str, spec: str) -> str:
    """A table cell; training columns of an untrained method (prompting) show a dash, not a misleading 0."""
    if not row.get("trained", True) and key in TRAINING_KEYS:
        return "—"
    return fmt(row.get(key), spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_confusion(cond: dict[str, Any], path: Path, title: str) -> Path:
    """Requested label (rows) vs the judge's label (columns), counts in the cells."""
    plt = _plt()
    labels, matrix = cond["labels"], cond["confusion"]
    size = max(4.0, 0.7 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_xlabel("judge's label")
    ax.set_ylabel("requested label")
    ax.set_title(f"{title}\naccuracy {cond['accuracy']:.3f} over {cond['samples']} samples", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def eval_markdown(report: dict[str, Any]) -> str:
    """The `prefixtune eval` report as markdown."""
    r = report["result"]
    lines = [f"# Evaluation of `{report['adapter']}`", "",
             f"- base model: `{report['model']}`; data: `{report['data']}`, split `{report['split']}`",
             f"- eval loss **{r['eval_loss']:.4f}** (perplexity {r['perplexity']:.2f}) over {r['eval_rows']} "
             f"rows / {r['eval_tokens']} text tokens"]
    judge = report.get("judge")
    if judge and judge.get("accuracy") is not None:
        lines.append(f"- judge `{judge['name']}`: {judge['accuracy']:.3f} accuracy "
                     f"({judge.get('macro_accuracy', float('nan')):.3f} macro) on real "
                     f"{judge.get('accuracy_split', '?')} text: conditioning accuracy is only as good as this")
    elif judge:
        lines.append(f"- judge `{judge['name']}` (its own accuracy is unknown)")
    guidance = r.get("guidance")
    if guidance and guidance["scale"] != 1.0:
        lines.append(f"- samples guided x{guidance['scale']:g} against "
                     f"`{guidance['negative'] or 'the base model'}` (`--guidance-scale 1` turns it off)")
    cond = r.get("conditioning")
    if cond:
        lines += ["", f"## Conditioning accuracy: {cond['accuracy']:.3f}", "",
                  markdown_table(["label", "accuracy"],
                                 [[label, f"{acc:.3f}"] for label, acc in cond["per_label"].items()]),
                  "", "![confusion matrix](confusion.png)"]
    copy = r.get("copy_rate")
    lines += ["", "## Samples", "",
              f"- distinct-1 {r['distinct_1']:.3f}, distinct-2 {r['distinct_2']:.3f}; copies of a training text: "
              f"{fmt(copy, '{:.1%}')}"]
    if r.get("latency_ms_per_token") is not None:
        lines.append(f"- generation: {r['latency_ms_per_token']:.2f} ms/token, "
                     f"{fmt(r.get('latency_overhead_pct'), '{:+.1f}%')} vs the base model")
    for s in r["samples"][:12]:
        judged = f" (judge: {s['judged']})" if "judged" in s else ""
        lines.append(f"- `{s['label']}`{judged}: {s['text'][:160]!r}")
    lines += quality_lines([("samples", r)]) + sweep_lines(r.get("guidance_sweep"))
    refs = r.get("references")
    if refs:
        lines += ["", "## Against references", "",
                  f"BLEU {refs['bleu']:.2f}, chrF {refs['chrf']:.2f}, ROUGE-L {refs['rouge_l']:.2f} over "
                  f"{refs['rows']} rows (greedy)"]
    return "\n".join(lines) + "\n"


QUALITY_HEADERS = ["", "conditioning acc.", "worst label", "mean words", "distinct-2", "degenerate",
                   "has label word", "base-model ppl"]


def quality_row(name: str, stats: dict[str, Any], accuracy: Any = None, worst: Any = None) -> list[str]:
    return [name, fmt(accuracy, "{:.3f}"), fmt(worst, "{:.2f}"), fmt(stats.get("mean_words"), "{:.1f}"),
            fmt(stats.get("distinct_2"), "{:.3f}"), fmt(stats.get("degenerate"), "{:.1%}"),
            fmt(stats.get("label_word"), "{:.1%}"), fmt(stats.get("base_perplexity"), "{:.1f}")]


def quality_lines(named: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """Samples of each method beside real text: the table a skeptic reads first."""
    rows, real, ceiling = [], None, None
    for name, result in named:
        q = result.get("quality") if result else None
        if not q:
            continue
        cond = result.get("conditioning") or {}
        per = cond.get("per_label") or {}
        rows.append(quality_row(name, q["samples"], cond.get("accuracy"), min(per.values()) if per else None))
        real, ceiling = real or q["real"], ceiling or q.get("ceiling")
    if not rows:
        return []
    if real:
        worst = min(ceiling["per_label"].values()) if ceiling and ceiling.get("per_label") else None
        rows.append(quality_row(f"real text ({real['n']} rows)", real, real.get("judge_accuracy"), worst))
    lines = ["", "## Samples beside real text", "", markdown_table(QUALITY_HEADERS, rows), ""]
    if ceiling:
        lines.append(f"The real-text row's accuracy is the judge's on those rows, its worst label the judge's lowest "
                     f"recall on real {ceiling.get('split') or ''} text (macro recall "
                     f"{fmt(ceiling.get('macro'), '{:.3f}')}): the ceiling conditioning accuracy can reach. "
                     "Degenerate: a character or word repeated 4+ times in a row.")
    return lines


def sweep_lines(sweep: list[dict[str, Any]] | None) -> list[str]:
    if not sweep:
        return []
    rows = [[fmt(r["guidance_scale"], "{:g}"), fmt(r.get("accuracy"), "{:.3f}"), fmt(r.get("worst_label"), "{:.2f}"),
             fmt(r["mean_words"], "{:.1f}"), fmt(r["distinct_2"], "{:.3f}"), fmt(r["degenerate"], "{:.1%}"),
             fmt(r.get("label_word"), "{:.1%}")] for r in sweep]
    return ["", "## Guidance sweep", "",
            markdown_table(["scale", "accuracy", "worst label", "mean words", "distinct-2", "degenerate",
                            "has label word"], rows), "", "![guidance sweep](guidance_sweep.png)"]


def compare_markdown(results: dict[str, Any]) -> str:
    rows = results["methods"]
    table = markdown_table(["method"] + [h for _, h, _ in COMPARE_COLUMNS],
                           [[row["method"]] + [cell(row, k, spec) for k, _, spec in COMPARE_COLUMNS]
                            for row in rows])
    cfg, judge = results["config"], results.get("judge") or {}
    lines = [f"# {' vs '.join(cfg.get('methods', []))}", "", settings_line(results), "", table, ""]
    if judge.get("accuracy") is not None:
        lines.append(f"Judge: {judge['name']}, {judge['accuracy']:.3f} accuracy on real {judge['accuracy_split']} "
                     f"text (conditioning accuracy cannot be trusted beyond that).")
    lines += [f"Base model generation: {fmt(results.get('base_latency_ms_per_token'), '{:.2f}')} ms/token. "
              f"Eval loss on {cfg['eval_examples']} `{cfg['split']}` rows; "
              f"{cfg['samples_per_label']} samples per label.", "",
              "![quality](bars_quality.png) ![cost](bars_cost.png) ![loss curves](loss_curves.png)", ""]
    for row in rows:
        cond = row.get("conditioning")
        extra = f", per label: {', '.join(f'{k} {v:.2f}' for k, v in cond['per_label'].items())}" if cond else ""
        lines.append(f"- **{row['method']}**: distinct-2 {row['distinct_2']:.3f}, copies "
                     f"{fmt(row.get('copy_rate'), '{:.1%}')}{extra}")
    lines += quality_lines([(row["method"], row) for row in rows])
    return "\n".join(lines) + "\n"


def settings_line(results: dict[str, Any]) -> str:
    c = results["config"]
    methods = c.get("methods", ["prefix", "lora", "prompt"])
    lrs = f"lr {c['lr']:g}"
    if c.get("prefix_lr") is not None or c.get("lora_lr") is not None:
        lrs = f"lr prefix {c.get('prefix_lr') or c['lr']:g} / LoRA {c.get('lora_lr') or c['lr']:g}"
    balance = "balanced, " if c["balance"] else ""
    device = results.get("device", "?")
    if device == "cpu" and results.get("torch_threads"):
        device += f" ({results['torch_threads']} torch thread{'s' if results['torch_threads'] > 1 else ''})"
    parts = [f"Settings: base `{c['model']}` on {device}, data `{c['data']}` ({balance}"
             f"{c['steps']} steps x batch {c['batch_size']}, seed {c['seed']}, {lrs}, {c['schedule']} schedule)"]
    if "prefix" in methods:
        mlp = " + MLP" if c["prefix_projection"] else ""
        if c.get("per_label"):
            mlp += ", one adapter per label (parameters and file sizes summed)"
        parts.append(f"prefix {c['num_virtual_tokens']} virtual tokens{mlp}")
    if "lora" in methods:
        parts.append(f"LoRA r={c['lora_r']}, alpha={c['lora_alpha']} on "
                     f"{', '.join(c['lora_targets']) if c.get('lora_targets') else 'attention projections'}")
    if "full" in methods:
        parts.append(f"full fine-tuning: every weight, lr {c.get('full_lr') or c['lr']:g}, sampled unguided")
    if "prompt" in methods:
        parts.append(f"prompt: \"{c['instruction']}\"")
    return "; ".join(parts) + "."


def plot_bars(rows: list[dict[str, Any]], path: Path, keys: list[tuple[str, str]], title: str) -> Path:
    """One bar chart per metric, side by side; n/a values are left out (and said so)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    axes = axes if len(keys) > 1 else [axes]
    colors = {"prefix": "tab:blue", "lora": "tab:orange", "full": "tab:red", "prompt": "tab:green"}
    for ax, (key, label) in zip(axes, keys):
        names = [r["method"] for r in rows]
        # An untrained method (prompting) has no training cost to draw; a 0 bar would read as "free".
        values = [None if key in TRAINING_KEYS and not r.get("trained", True) else r.get(key) for r in rows]
        shown = [(n, v) for n, v in zip(names, values) if isinstance(v, (int, float)) and math.isfinite(v)]
        ax.bar([n for n, _ in shown], [v for _, v in shown], color=[colors.get(n, "tab:gray") for n, _ in shown])
        for i, (_, v) in enumerate(shown):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if len(shown) < len(names):
            ax.set_xlabel("n/a: " + ", ".join(n for n, v in zip(names, values) if (n, v) not in shown), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Train loss per step of every trained method on one axis (eval losses as markers)."""
    if not any(histories.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
        evals = [(r["step"], r["eval_loss"]) for r in history if r.get("kind") == "eval"]
        if train:
            (line,) = ax.plot(*zip(*train), label=f"{name} train", alpha=0.8)
            if evals:
                ax.plot(*zip(*evals), "o", color=line.get_color(), label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training loss, same batches for every method")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
