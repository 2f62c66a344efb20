"""`prefixtune compare` on task data (a template over row fields): prefix vs LoRA (vs full fine-tuning) vs the
untrained base model.

Training is compare's own (same rows, steps, batches, seed; each method in its own process); evaluation
decodes the same distinct test inputs with every method (greedy or --num-beams) and scores them against all
of each input's references (BLEU, chrF, ROUGE-L). The "prompt" method is the base model under the same
template, the untrained reference line.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefixtune.eval.reference import DecodeSettings, score_methods, scores_table
from prefixtune.eval.report import write_json
from prefixtune.fileio import atomic_write_text


def run_task_compare(cfg, say=print) -> dict[str, Any]:
    """Train prefix/LoRA, score every method on references; writes results.json / results.md under cfg.out."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.eval.compare_setup import result_row, train_method
    from prefixtune.eval.task_eval import load_task_items
    from prefixtune.models import load_base_model
    from prefixtune.runtime import configure_threads

    from prefixtune.eval.compare_setup import CompareConfigError

    if cfg.per_label:
        raise CompareConfigError("--per-label trains one adapter per label; a task template conditions on the "
                                 "row's fields instead. Fix: drop --per-label")
    started = time.perf_counter()
    out = Path(cfg.out)
    ref_field = cfg.reference_field or cfg.text_field
    items, data, n_rows, n_items = load_task_items(cfg.data, cfg.template, ref_field, cfg.split, cfg.reference_rows,
                                                   cfg.seed, cfg.label_field, cfg.label_names)
    say(f"{cfg.split}: {n_rows} rows = {n_items} distinct inputs; scoring {len(items)} against '{ref_field}'")
    threads = configure_threads(say)
    loaded = None if cfg.isolate else load_base_model(cfg.model, cfg.device, cfg.dtype)
    trained = {m: train_method(m, cfg, say, loaded, None, threads) for m in cfg.methods if m != "prompt"}
    loaded = loaded or load_base_model(cfg.model, cfg.device, cfg.dtype)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    lm = PrefixLM(loaded, out / "prefix")
    methods = _task_methods(cfg.methods, trained, lm)
    settings = DecodeSettings(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.eval_batch_size, progress=cfg.progress)
    scores = score_methods(lm, methods, cfg.template, items, settings, say)
    rows = [result_row(m, trained.get(m), {k: v for k, v in scores[m].items() if k != "outputs"}, base_params)
            for m in cfg.methods]
    results = {"task": True, "config": asdict(cfg), "device": str(loaded.device), "template": cfg.template,
               "reference_field": ref_field, "test_rows": n_rows, "test_inputs": n_items,
               "data_fingerprint": data.fingerprint, "base_params": base_params, "torch_threads": threads,
               "seconds": time.perf_counter() - started, "methods": rows,
               "outputs": {m: scores[m]["outputs"] for m in cfg.methods}}
    write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", task_compare_markdown(results, scores))
    say(f"wrote {out / 'results.md'} ({results['seconds']:.0f} s)")
    return results


def _task_methods(names: list[str], trained: dict[str, Any], lm) -> dict[str, tuple[str | None, Any]]:
    """Each method as score_methods runs it: (its adapter, or None; a context that applies its weights to the
    engine's base model while it decodes, or None)."""
    from contextlib import contextmanager

    from prefixtune.train.methods import full_applied, lora_applied

    methods: dict[str, tuple[str | None, Any]] = {}
    for method in names:
        if method == "prefix":
            (name, folder), = trained["prefix"]["adapters"].items()
            lm.register(name, folder)
            methods["prefix"] = (name, None)
        elif method == "lora":
            folder = trained["lora"]["adapters"]["lora"]

            @contextmanager
            def applied(folder=folder):
                with lora_applied(lm.model, folder):
                    yield

            methods["lora"] = (None, applied)
        elif method == "full":  # the fine-tuned weights as the engine's base model while it decodes
            methods["full"] = (None, lambda folder=trained["full"]["adapters"]["full"]: full_applied(lm.model, folder))
        else:
            methods["prompt"] = (None, None)
    return methods


def task_compare_markdown(results: dict[str, Any], scores: dict[str, dict[str, Any]]) -> str:
    cfg = results["config"]
    lines = [f"# prefix vs LoRA on `{cfg['data']}` ({cfg['split']})", "",
             f"Template `{cfg['template']!r}` -> `{results['reference_field']}`; {cfg['steps']} steps x batch "
             f"{cfg['batch_size']}, seed {cfg['seed']}; `prompt` = the base model under the same template.", "",
             scores_table({m: s for m, s in scores.items()}), "",
             "| method | trainable params | adapter file (KB) | train time (s) |", "|---|---|---|---|"]
    for r in results["methods"]:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['adapter_bytes'] / 1024:,.1f} | "
                     f"{r['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
