"""`prefixtune eval` for a task adapter (a template over row fields): reference metrics vs the untrained base.

Rows with the same input are grouped into one multi-reference item, each item is decoded once with the
adapter and once with the bare base model under the same template (the untrained reference line).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefixtune.adapter_folder import StoreError
from prefixtune.data import DataError
from prefixtune.eval.reference import DecodeSettings, group_items, sample_items, score_methods, scores_table
from prefixtune.eval.report import write_json
from prefixtune.fileio import atomic_write_text
from prefixtune.templates import input_fields

BASE = "base (same template, no prefix)"


def decode_settings(cfg) -> DecodeSettings:
    return DecodeSettings(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.eval_batch_size, progress=cfg.progress)


def load_task_items(source: str, template: str, reference_field: str, split: str, limit: int | None, seed: int,
                    label_field: str | None = None, label_names: list[str] | None = None):
    """The split's rows grouped into multi-reference items (a seeded sample of `limit`), and the data."""
    from prefixtune.data import load_data

    labelled = "{label}" in template
    data = load_data(source, reference_field, label_field if labelled else None, label_names if labelled else None,
                     input_fields=input_fields(template))
    rows = data.split(split)
    items = group_items(rows)
    if not items:
        raise DataError(f"{source}: no '{split}' rows with a non-empty '{reference_field}'")
    return sample_items(items, limit, seed), data, len(rows), len(items)


def run_task_eval(cfg, store, folders: dict[str, Path], manifest, say=print) -> dict[str, Any]:
    """Reference scores of one task adapter and of the base model; writes eval.json / eval.md / samples.jsonl."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model

    if len(folders) != 1:
        raise StoreError(f"{cfg.adapter}: task evaluation takes one adapter, got {', '.join(folders)}")
    adapter = next(iter(folders))
    hp = manifest.hyperparams or {}
    source = cfg.data or manifest.dataset.get("source")
    if not source:
        raise DataError("no data to evaluate on. Fix: pass --data (a folder, file or Hub id)")
    ref_field = cfg.reference_field or cfg.text_field or hp.get("text_field") or "text"
    label_field = cfg.label_field if cfg.label_field is not None else hp.get("label_field", "label")
    items, data, n_rows, n_items = load_task_items(source, manifest.template, ref_field, cfg.split,
                                                   cfg.reference_rows, cfg.seed, label_field,
                                                   cfg.label_names or hp.get("label_names"))
    say(f"{cfg.split}: {n_rows} rows = {n_items} distinct inputs; scoring {len(items)} of them against "
        f"'{ref_field}' ({sum(len(i.references) for i in items)} references)")
    model_name = cfg.model or manifest.base_model
    lm = PrefixLM(load_base_model(model_name, cfg.device, cfg.dtype), store)
    settings = decode_settings(cfg)
    results = score_methods(lm, {adapter: (adapter, None), BASE: (None, None)}, manifest.template, items,
                            settings, say)
    out = Path(cfg.out or Path("runs") / "eval" / cfg.adapter)
    samples = [{"inputs": item.inputs, "references": item.references,
                **{name: r["outputs"][i] for name, r in results.items()}} for i, item in enumerate(items)]
    report = {"adapter": cfg.adapter, "task": True, "template": manifest.template, "fields": input_fields(
        manifest.template), "model": model_name, "data": data.source, "data_fingerprint": data.fingerprint,
              "split": cfg.split, "reference_field": ref_field, "rows": n_rows, "distinct_inputs": n_items,
              "config": asdict(cfg),
              "result": {name: {k: v for k, v in r.items() if k != "outputs"} for name, r in results.items()}}
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    write_json(out / "eval.json", report)
    atomic_write_text(out / "eval.md", task_markdown(report))
    say(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return report


def task_markdown(report: dict[str, Any]) -> str:
    result = report["result"]
    first = next(iter(result.values()))
    lines = [f"# {report['adapter']}: reference evaluation on {report['data']} ({report['split']})", "",
             f"Template `{json.dumps(report['template'])[1:-1]}`; {first['items']} distinct inputs with "
             f"{first['references']} references (`{report['reference_field']}`), {first['decoding']} decoding, "
             f"at most {first['max_new_tokens']} new tokens. BLEU and chrF are corpus scores over all references "
             f"of each input (sacrebleu); ROUGE-L is the mean F1 against each input's best reference.", "",
             scores_table(result), "", "## Examples", ""]
    for ex in first["examples"][:3]:
        lines += [f"- input: `{ex['prompt'].strip()}`", f"  - output: {ex['output']}",
                  f"  - a reference: {ex['references'][0]}"]
    return "\n".join(lines) + "\n"
