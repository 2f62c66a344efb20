"""The README's "Prefix tuning or LoRA?" section, written from a real compare run's numbers.

Every claim is computed from results.json, so re-running `prefixtune compare --config OUT/config.json`
regenerates the section (OUT/readme_section.md) instead of leaving stale prose behind.
"""

from __future__ import annotations

import math
from typing import Any

from prefixtune.eval.report import cell, fmt, markdown_table, settings_line

_COLUMNS = [("trainable_params", "trainable params", "{:,.0f}"), ("adapter_bytes", "adapter file (KB)", "kb"),
            ("train_seconds", "train time (s)", "{:.0f}"), ("peak_train_memory_mb", "peak train mem (MB)", "{:,.0f}"),
            ("train_memory_added_mb", "added by training (MB)", "{:,.0f}"),
            ("eval_loss", "eval loss", "{:.3f}"), ("conditioning_accuracy", "conditioning acc.", "{:.2f}"),
            ("latency_overhead_pct", "decode overhead", "{:+.0f}%")]


def _times(a: float, b: float, what: str, other: str) -> str:
    """'3.2x as many params as LoRA' / '4.0x fewer params than LoRA'."""
    if not a or not b:
        return f"a different number of {what} than {other}"
    return f"{a / b:.1f}x as many {what} as {other}" if a >= b else f"{b / a:.1f}x fewer {what} than {other}"


# Flags worth showing in the command line when they differ from the defaults (the rest is in config.json).
_FLAGS = ("model", "batch_size", "balance", "lr", "prefix_lr", "lora_lr", "full_lr", "seed", "num_virtual_tokens",
          "per_label", "lora_r", "split", "eval_examples", "samples_per_label", "device")
_BOOL_FLAGS = {"balance": ("--balance", "--no-balance"), "per_label": ("--per-label", "--single")}


def compare_command(cfg: dict[str, Any]) -> str:
    """The `prefixtune compare` command line that reproduces the headline settings of a run."""
    from dataclasses import fields

    from prefixtune.eval.compare_setup import CompareConfig

    defaults = {f.name: getattr(CompareConfig(), f.name) for f in fields(CompareConfig)}
    parts = ["prefixtune compare", f"--data {cfg['data']}", f"--methods {','.join(cfg['methods'])}",
             f"--steps {cfg['steps']}"]
    for key in _FLAGS:
        value = cfg.get(key)
        if value is None or value == defaults.get(key):
            continue
        if key in _BOOL_FLAGS:
            parts.append(_BOOL_FLAGS[key][0 if value else 1])
        else:
            parts.append(f"--{key.replace('_', '-')} {value:g}" if isinstance(value, float)
                         else f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def _gap(a: dict[str, Any], b: dict[str, Any], noise: float, n: int) -> str:
    """How a's conditioning accuracy compares with b's, given the sampling noise of n samples each."""
    x, y = a.get("conditioning_accuracy"), b.get("conditioning_accuracy")
    if x is None or y is None or not n:
        return "not comparable"
    if abs(x - y) <= noise:
        return f"a gap within sampling noise: +/-{noise:.2f} at 95% for {n} samples each"
    return f"{'ahead of' if x > y else 'behind'} {b['method']} by more than the +/-{noise:.2f} sampling noise"


def _overhead(row: dict[str, Any]) -> str:
    x = row.get("latency_overhead_pct")
    if x is None:
        return "decode time not measured"
    # Alternating timed runs on a shared CPU still wobble by a few percent; do not read a trend into that.
    return f"{x:+.0f}% per token here" + (", within timing noise" if abs(x) < 5 else "")


def _load_note(results: dict[str, Any], *rows: dict[str, Any]) -> str:
    loads = [r.get("train_load_average") for r in rows]
    if any(not isinstance(x, (int, float)) or x != x for x in loads):
        return ""
    cores = results.get("cpu_count") or "?"
    busy = max(loads) > 1.5 * float(cores) if cores != "?" else False
    return (f"; 1-minute load average {' / '.join(f'{x:.1f}' for x in loads)} on {cores} cores"
            + (": other jobs shared the machine, so these timings are rough" if busy else ""))


def _against_full(results: dict[str, Any], p: dict[str, Any], full: dict[str, Any], noise: float, n: int) -> str:
    """The claims repeated about prefix tuning (less training memory, tiny files, quality given up), measured."""
    def less(key: str) -> str:
        return fmt(1 - p[key] / full[key] if full.get(key) else None, "{:.0%}")

    return (f"**Against full fine-tuning.** Every weight trains there ({full['trainable_params']:,} parameters, "
            f"{_times(p['trainable_params'], full['trainable_params'], 'parameters', 'full fine-tuning')} for the "
            f"prefix); its checkpoint is {fmt(full['adapter_bytes'], 'kb')} KB, "
            f"{full['adapter_bytes'] / max(p['adapter_bytes'], 1):,.0f}x the prefix's. Peak training memory "
            f"{p['peak_train_memory_mb']:,.0f} vs {full['peak_train_memory_mb']:,.0f} MB "
            f"({less('peak_train_memory_mb')} less for the prefix), of which training itself added "
            f"{p['train_memory_added_mb']:,.0f} vs {full['train_memory_added_mb']:,.0f} MB "
            f"({less('train_memory_added_mb')} less); eval loss "
            f"{p['eval_loss']:.3f} vs {full['eval_loss']:.3f}, conditioning accuracy "
            f"{fmt(p.get('conditioning_accuracy'), '{:.2f}')} vs {fmt(full.get('conditioning_accuracy'), '{:.2f}')} "
            f"({_gap(p, full, noise, n)}).")


def _against_lora(results: dict[str, Any], p: dict[str, Any], lo: dict[str, Any], noise: float, n: int
                  ) -> list[str]:
    """Prefix tuning beside LoRA: size, quality at this budget, serving and training cost."""
    cfg = results["config"]
    better = "prefix tuning" if p["eval_loss"] < lo["eval_loss"] else "LoRA"
    return [
        f"**Size.** Prefix tuning trains {_times(p['trainable_params'], lo['trainable_params'], 'parameters', 'LoRA')}"
        f" here (with the MLP reparameterisation), but the MLP is folded away after training: "
        f"the saved prefix is {fmt(p['adapter_bytes'], 'kb')} KB against LoRA's {fmt(lo['adapter_bytes'], 'kb')} KB.",
        f"**Quality at this budget.** {better} reaches the lower eval loss ({p['eval_loss']:.3f} prefix vs "
        f"{lo['eval_loss']:.3f} LoRA); conditioning accuracy is {fmt(p.get('conditioning_accuracy'), '{:.2f}')} "
        f"vs {fmt(lo.get('conditioning_accuracy'), '{:.2f}')} ({_gap(p, lo, noise, n)}). With {cfg['steps']} "
        f"steps both are far from converged, so treat any gap as indicative, not final.",
        f"**Serving.** A prefix costs {p['prefix_length']:.0f} extra positions of attention per request "
        f"({_overhead(p)}) and needs no change to the weights, so rows with different prefixes share one batch "
        f"of one base model. Unmerged LoRA adds extra matmuls ({_overhead(lo)}); merged it is free, but then "
        f"each adapter needs its own copy of the weights.",
        f"**Training cost.** {p['train_seconds']:.0f} s vs {lo['train_seconds']:.0f} s for the same "
        f"{cfg['steps']} steps, peak memory {p['peak_train_memory_mb']:,.0f} vs {lo['peak_train_memory_mb']:,.0f} MB "
        f"({'GPU memory' if str(results.get('device', '')).startswith('cuda') else 'process peak RSS'})"
        f"{_load_note(results, p, lo)}.",
    ]


def _against_prompting(pr: dict[str, Any], rows: list[dict[str, Any]], noise: float) -> str:
    """The prompted instruct model beside the trained methods (`rows`): its cost and where its accuracy falls."""
    trained = [r for r in rows if r.get("conditioning_accuracy") is not None]
    best_loss = min((r["eval_loss"] for r in trained), default=None)
    acc = pr.get("conditioning_accuracy")
    groups: dict[str, list[str]] = {}
    for r in trained:
        diff = r["conditioning_accuracy"] - (acc or 0.0)
        key = "within sampling noise of it" if abs(diff) <= noise else "above it" if diff > 0 else "below it"
        groups.setdefault(key, []).append(r["method"])
    verdict = "; ".join(f"{' and '.join(m)} {'is' if len(m) == 1 else 'are'} {k}" for k, m in groups.items())
    return (
        f"**Prompting baseline.** Asking the instruct model costs no training but "
        f"{pr['prefix_length']:.0f} prompt tokens per request. Its conditioning accuracy is "
        f"{fmt(acc, '{:.2f}')} ({verdict or 'nothing to compare with'}; +/-{noise:.2f} at 95%)"
        + (f", and its eval loss of {pr['eval_loss']:.3f} against {best_loss:.3f} for the best trained method "
           + ("shows it does not write in the data's style" if pr["eval_loss"] > best_loss + 0.1
              else "is about the same") if best_loss is not None else "") + ".")


def readme_section(results: dict[str, Any]) -> str:
    rows = {r["method"]: r for r in results["methods"]}
    table_rows = []
    for r in results["methods"]:
        cells = [r["method"]]
        cells += [cell(r, key, spec) for key, _, spec in _COLUMNS]
        table_rows.append(cells)
    judge = results.get("judge") or {}
    cfg = results["config"]
    lines = ["## Prefix tuning or LoRA?", "",
             f"Numbers from `{compare_command(cfg)}` (every setting is in the run's config.json; "
             f"`prefixtune compare --config config.json` repeats it). {settings_line(results)}", "",
             markdown_table(["method"] + [h for _, h, _ in _COLUMNS], table_rows), ""]
    if judge.get("accuracy") is not None:
        lines.append(f"Conditioning accuracy = share of {cfg['samples_per_label']} samples per label that a "
                     f"{judge['name']} classifier (accuracy {judge['accuracy']:.2f} on real {judge['accuracy_split']} "
                     f"text) assigns to the requested label; eval loss is per text token on "
                     f"{cfg['eval_examples']} `{cfg['split']}` rows. Decode overhead is measured against the bare "
                     f"base model on the same short prompts.")
        lines.append("")
    bullets = []
    p, lo, pr = rows.get("prefix"), rows.get("lora"), rows.get("prompt")
    n = cfg["samples_per_label"] * len(results.get("labels") or [0])
    # Worst-case (p = 0.5) 95% half-width of the difference between two accuracies over n samples each.
    noise = 1.96 * math.sqrt(2 * 0.25 / n) if n else float("nan")
    if p and lo:
        bullets += _against_lora(results, p, lo, noise, n)
    if p and (full := rows.get("full")):
        bullets.append(_against_full(results, p, full, noise, n))
    if pr:
        bullets.append(_against_prompting(pr, [r for r in (p, lo) if r], noise))
    bullets.append(
        "**Rule of thumb.** Pick prefix tuning when you serve many small adapters (per user, per label) on one "
        "frozen model and want them mixed in one batch, with tiny files; pick LoRA when one adapter per "
        "deployment is enough and you can merge it, or when the task needs more capacity than a prefix offers.")
    lines += [f"- {b}" for b in bullets]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """`python -m prefixtune.eval.readme OUT/results.json`: print the section again from a finished run."""
    import json
    import sys
    from pathlib import Path

    if len(argv) != 2:
        print("usage: python -m prefixtune.eval.readme OUT/results.json", file=sys.stderr)
        return 2
    print(readme_section(json.loads(Path(argv[1]).read_text())), end="")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv))
