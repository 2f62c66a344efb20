"""`prefixtune compare`: prefix tuning vs LoRA vs full fine-tuning vs prompting, same data, steps, batches and seed.

Each trained method trains in a fresh Python process by default (`isolate`), so "peak memory during
training" is that method's own peak and not the high-water mark of everything that ran before it in this
process. Evaluation then runs every method on one loaded base model, one split and one set of seeds.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from prefixtune.eval.compare_setup import (  # noqa: F401 - CompareConfig and its errors are compare's API
    METHODS,
    CompareConfig,
    CompareConfigError,
    TrainingFailed,
    load_compare_config,
    result_row,
    train_method,
    with_prefix_recipe,
)
from prefixtune.eval.evaluate import Method, evaluate_method
from prefixtune.eval.judge import describe_judge, load_judge
from prefixtune.eval.report import compare_markdown, plot_bars, plot_loss_curves, write_json
from prefixtune.eval.readme import readme_section
from prefixtune.fileio import atomic_write_text
from prefixtune.templates import fill_template, is_task_template


# ---- methods for evaluation -----------------------------------------------------------------------------

def prompt_method(lm, labels: list[str], cfg: CompareConfig) -> Method:
    """The zero-training baseline: the (instruct) base model asked in words for each label."""
    prompts = {}
    for label in labels:
        request = fill_template(cfg.instruction, label)
        chat = cfg.chat and bool(getattr(lm.tokenizer, "chat_template", None))
        prompts[label] = lm.chat_prompt(request) if chat else request + "\n"
    lengths = [len(lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts.values()]
    return Method("prompt", prompts, {}, sum(lengths) / len(lengths))


def trained_prompts(cfg: CompareConfig, labels: list[str]) -> dict[str, str]:
    """What the trained methods (and the base-model latency reference) are prompted with per label."""
    template = cfg.train_config("lora").resolved_template()  # label in the prompt (LoRA never trains per label)
    return {label: fill_template(template, label) for label in labels}


# ---- the comparison -------------------------------------------------------------------------------------

def run_compare(cfg: CompareConfig, say=print) -> dict[str, Any]:
    """Train, evaluate and report every method; writes results.json/.md, PNGs and config.json under cfg.out."""
    from prefixtune.data import load_data
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model

    cfg.validate()
    out = Path(cfg.out)
    write_json(out / "config.json", asdict(cfg))  # first, so even a failed run can be repeated
    if is_task_template(cfg.template):  # inputs -> text: scored against references, not a label judge
        from prefixtune.eval.task_compare import run_task_compare

        return run_task_compare(cfg, say)
    started = time.perf_counter()
    data = load_data(cfg.data, cfg.text_field, cfg.label_field, cfg.label_names)
    if not data.labels:
        raise CompareConfigError(f"{cfg.data}: compare needs labelled data (conditioning is what it measures)")
    data.split(cfg.split)
    labels = cfg.labels or data.labels
    judge = load_judge(data, cfg.judge, say) if cfg.samples_per_label > 0 else None

    from prefixtune.runtime import configure_threads

    threads = configure_threads(say)  # decided once: every method trains and is timed with the same threads
    loaded = None if cfg.isolate else load_base_model(cfg.model, cfg.device, cfg.dtype)
    trained = {m: train_method(m, cfg, say, loaded, data, threads) for m in cfg.methods if m != "prompt"}

    loaded = loaded or load_base_model(cfg.model, cfg.device, cfg.dtype)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    lm = PrefixLM(loaded, out / "prefix")
    # The bare model on the trained methods' short prompts is every method's 0% latency reference.
    base_prompts = list(trained_prompts(cfg, labels).values())

    rows = []
    for method in cfg.methods:
        evaluation = evaluate_one(method, lm, trained, labels, data, cfg, judge, base_prompts, say)
        write_json(out / method / "samples.json", evaluation["samples"])
        rows.append(result_row(method, trained.get(method), evaluation, base_params))

    bases = [r["base_latency_ms_per_token"] for r in rows if r.get("base_latency_ms_per_token") is not None]
    base_latency = statistics.median(bases) if bases else None
    results = {"config": asdict(cfg), "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
               "cpu_count": os.cpu_count(), "torch_threads": threads, "base_params": base_params,
               "base_latency_ms_per_token": base_latency,
               "judge": describe_judge(judge) if judge is not None else None, "labels": labels,
               "data_fingerprint": data.fingerprint, "seconds": time.perf_counter() - started, "methods": rows}
    write_outputs(results, out, {m: t.get("history", []) for m, t in trained.items()})
    say(f"wrote {out / 'results.md'} ({results['seconds']:.0f} s)")
    return results


def evaluate_one(method: str, lm, trained: dict[str, Any], labels: list[str], data, cfg: CompareConfig, judge,
                 base_prompts: list[str], say=print) -> dict[str, Any]:
    """One method's evaluation on the shared engine: prompting, the trained prefixes, or the trained LoRA or full
    fine-tuning applied to the base model for this evaluation only."""
    from prefixtune.eval.run_eval import method_from_adapters
    from prefixtune.train.methods import full_applied, lora_applied

    if method == "prompt":
        return evaluate_method(lm, prompt_method(lm, labels, cfg), data, cfg, judge, base_prompts, say=say)
    if method == "prefix":
        folders = trained["prefix"]["adapters"]
        for name, folder in folders.items():
            lm.register(name, folder)
        m = method_from_adapters("prefix", {n: Path(f) for n, f in folders.items()}, labels)
        m.prompts = {label: p for label, p in m.prompts.items() if label in labels}
        return evaluate_method(lm, m, data, cfg, judge, base_prompts, say=say)
    if method == "lora":
        # LoRA is injected into the shared base model for its evaluation only and removed afterwards;
        # disable_adapter() gives the bare model for the interleaved base timing.
        with lora_applied(lm.model, trained["lora"]["adapters"]["lora"]) as peft_model:
            m = Method("lora", dict(zip(labels, base_prompts)), {}, 0)
            return evaluate_method(lm, m, data, cfg, judge, base_prompts, peft_model.disable_adapter, say=say)
    # The fine-tuned weights run as the engine's base model for this evaluation (base_weights() puts the
    # originals back for the base timing). Unguided: no unconditioned companion shares its forward.
    with full_applied(lm.model, trained["full"]["adapters"]["full"]) as base_weights:
        m = Method("full", dict(zip(labels, base_prompts)), {}, 0)
        return evaluate_method(lm, m, data, replace(cfg, guidance_scale=None), judge, base_prompts, base_weights,
                               say=say)


def write_outputs(results: dict[str, Any], out: Path, histories: dict[str, list]) -> None:
    rows = results["methods"]
    write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", compare_markdown(results))
    plot_bars(rows, out / "bars_quality.png",
              [("eval_loss", "eval loss (lower is better)"), ("conditioning_accuracy", "conditioning accuracy"),
               ("distinct_2", "distinct-2")], "quality")
    plot_bars([{**r, "adapter_kb": r["adapter_bytes"] / 1024} for r in rows], out / "bars_cost.png",
              [("trainable_params", "trainable params"), ("adapter_kb", "adapter file (KB)"),
               ("peak_train_memory_mb", "peak train memory (MB)"),
               ("train_memory_added_mb", "memory added by training (MB)"), ("train_seconds", "train time (s)"),
               ("latency_ms_per_token", "ms / generated token")], "cost")
    plot_loss_curves(histories, out / "loss_curves.png")
    atomic_write_text(out / "readme_section.md", readme_section(results))
