"""`make demo`: a per-label emotion family trained in one pass, guided samples from one mixed batch, and the
figures that say whether the adapters steer: conditioning accuracy (judged) beside the judge's own ceiling,
length and diversity beside real text, unguided and guided."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

MIN_P = 0.05  # the unguided row's tail cut (engine/sampling.py), also shown in docs/BENCHMARKS.md "Control quality"


def run_demo(model: str, data: str, out: str, quick: bool = False, steps: int | None = None) -> None:
    from prefixtune.data import load_data
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.eval.run_eval import method_from_adapters
    from prefixtune.models import load_base_model
    from prefixtune.store import AdapterStore
    from prefixtune.train.config import FAMILY_RECIPE, TrainConfig
    from prefixtune.train.run import train

    console = Console()
    started = time.perf_counter()
    loaded = load_base_model(model)
    console.print(f"base model [bold]{loaded.name}[/] from {loaded.path} on {loaded.device} ({loaded.dtype})")
    bundle = load_data(data)
    counts = bundle.label_counts("train")
    console.print(f"data {data}: {sum(counts.values())} train rows, labels "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
    store_dir = Path(out) / "adapters"
    cfg = TrainConfig(
        model=model, data=data, out=str(Path(out) / "train"), store=str(store_dir), name="emotion",
        max_examples=120 if quick else 960,
        max_steps=steps or (30 if quick else 150),
        eval_every=0 if quick else 50,
        eval_examples=48 if quick else 192,
        num_virtual_tokens=10 if quick else 20,
        save_every=50,
        per_label=True,
        **FAMILY_RECIPE,
        overwrite=True,  # the demo owns its folder: `make demo` again replaces the previous demo run
    )
    result = train(cfg, loaded=loaded, data=bundle, say=console.print)
    if result.interrupted:
        return
    lm = PrefixLM(loaded, AdapterStore(store_dir))
    family = {n: p for n, p in result.adapters.items() if not n.endswith("-all")}
    method = method_from_adapters("emotion", family, bundle.labels)
    labels = [label for label in method.labels if label is not None]
    scale = cfg.guidance_scale or 1.0

    console.print(_sample_table(lm, method, labels, scale, quick))
    console.print(_figures(lm, method, bundle, labels, scale, quick))
    console.print(f"adapters in {store_dir}; demo took {time.perf_counter() - started:.0f} s. Full report: "
                  f"prefixtune eval --adapter emotion --store {store_dir} --data {data} --guidance-sweep 1,1.5,2,3")


def _sample_table(lm, method, labels: list[str], scale: float, quick: bool) -> Table:
    """One sample per emotion, all from one mixed batch of the family's adapters."""
    generations = lm.generate([method.prompts[label] for label in labels],
                              adapters=[method.adapter(label) for label in labels],
                              max_new_tokens=24 if quick else 40, temperature=1.0, top_p=1.0,
                              seed=list(range(len(labels))))
    negative = lm.guidance(method.adapter(labels[0]))[1] or "the base model"
    table = Table(title=f"one sample per emotion, one mixed batch of {len(labels)} adapters "
                        f"(guidance x{scale:g} against {negative}, as the manifests recommend)")
    table.add_column("adapter")
    table.add_column("generated text")
    for label, gen in zip(labels, generations):
        table.add_row(method.adapter(label), gen.text.strip())
    return table


def _figures(lm, method, bundle, labels: list[str], scale: float, quick: bool) -> Table:
    """The figures: the same seeded samples unguided and guided, judged by a classifier trained on the data, and
    their length and diversity beside real text's."""
    from prefixtune.eval.evaluate import EvalSettings, guidance_sweep
    from prefixtune.eval.judge import load_judge
    from prefixtune.eval.quality import real_sample, sample_stats

    per_label = 4 if quick else 16
    settings = EvalSettings(samples_per_label=per_label, max_new_tokens=24 if quick else 40, progress=False,
                            guidance_sweep=sorted({1.0, scale}), eval_batch_size=24)
    judge = load_judge(bundle, None, lambda *a: None)
    rows = guidance_sweep(lm, method, settings, judge, say=lambda *a: None)
    # Unguided with the tail cut: T=1 also samples the junk a 135M model keeps in its tail.
    rows += [dict(row, min_p=MIN_P) for row in guidance_sweep(
        lm, method, replace(settings, guidance_sweep=[1.0], min_p=MIN_P), judge, say=lambda *a: None)]
    real = sample_stats([ex.text for ex in real_sample(bundle, "test", labels, per_label, 0)],
                        [None] * (per_label * len(labels)))
    figures = Table(title=f"{per_label} samples per emotion at temperature {settings.temperature:g}, judged by "
                          f"{judge.name} (its macro recall on real text, the ceiling: {judge.macro_accuracy:.2f})")
    for header in ("", "accuracy", "worst emotion", "mean words", "distinct-2", "degenerate"):
        figures.add_column(header, justify="right" if header else "left")
    for row in rows:
        worst = min(row["per_label"], key=row["per_label"].get)
        what = "adapters alone" if row["guidance_scale"] == 1.0 else f"guided x{row['guidance_scale']:g}"
        what += f", min-p {row['min_p']:g}" if row.get("min_p") else ""
        figures.add_row(what, f"{row['accuracy']:.2f}", f"{worst} {row['per_label'][worst]:.2f}",
                        f"{row['mean_words']:.1f}", f"{row['distinct_2']:.2f}", f"{row['degenerate']:.0%}")
    figures.add_row("real test text", "", "", f"{real['mean_words']:.1f}", f"{real['distinct_2']:.2f}",
                    f"{real['degenerate']:.0%}")
    return figures
