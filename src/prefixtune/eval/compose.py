"""`prefixtune eval --compose emotion,agnews`: two per-label families on one row, every combination, each aspect
judged by its own family's judge.

For every combination of labels (6 emotions x 4 topics = 24) it samples `samples_per_label` texts per way of
composing (engine/compose.py: the product of experts "guidance", the same keeping the best of `best_of` samples
by their evidence "best", and prefix concatenation "concat"), and as
baselines each family's adapter alone (judged on both aspects: the other aspect at chance shows what
composition adds) and the instruct model prompted with both attributes. Every method's sample i of a
combination draws from the same seeded stream. Reported: per-aspect and joint accuracy (both aspects right),
a per-combination table, mean words, distinct-2 and degenerate share, beside each judge's accuracy on its own
real test text (the ceiling) and the real texts' length.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prefixtune.data import DataBundle, DataError
from prefixtune.engine.guidance import OFF
from prefixtune.eval.evaluate import EvalSettings, Method, generate_texts, sample_seeds, start_prompt
from prefixtune.eval.judge import Judge, check_judge_labels, describe_judge, load_judge
from prefixtune.eval.quality import real_sample, sample_stats
from prefixtune.eval.report import fmt, write_json
from prefixtune.fileio import atomic_write_text
from prefixtune.store import AdapterStore, StoreError, read_manifest

__all__ = ["ComposeEvalConfig", "run_compose_eval"]

DEFAULT_INSTRUCTION = "Write a short text that expresses {0} and is about {1}."
MODES = ("guidance", "concat")  # the composed methods (engine/compose.py)
# best: the product of experts drawing best_of samples per row and keeping the one with the most evidence;
# alone: each family's adapter by itself; prompting: the instruct model asked for both attributes
METHODS = ("guidance", "best", "concat", "alone", "prompting")


@dataclass
class ComposeEvalConfig(EvalSettings):
    """`prefixtune eval --compose A,B` settings (plus the shared EvalSettings)."""

    families: list[str] = field(default_factory=list)  # per-label families NAME (adapters NAME-<label>), 2 or more
    data: list[str] | None = None  # each family's labelled data (default: what its adapters were trained on)
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # what to sample (composed modes, baselines)
    weights: list[float] | None = None  # guidance: each family's part scale, in --compose order (default: engine's)
    best_of: int = 2  # the "best" method's samples per row (it keeps the one whose parts' evidence is highest)
    instruction: str = DEFAULT_INSTRUCTION  # the prompting baseline's request, {0} {1} ... = each family's label
    store: str | None = None  # adapter store (default $PREFIXTUNE_HOME/adapters)
    model: str | None = None  # base model (default: the one in the first family's manifests)
    out: str | None = None  # report folder (default runs/eval/compose-A-B)
    device: str | None = None  # cpu | cuda | auto
    dtype: str | None = None  # float32 | bfloat16 | float16 | auto


@dataclass
class Family:
    """One aspect: its adapters, its data and its judge."""

    name: str
    method: Method  # label -> prompt and adapter
    data: DataBundle
    judge: Judge

    @property
    def labels(self) -> list[str]:
        return [label for label in self.method.labels if label is not None]


def _family(store: AdapterStore, name: str, source: str | None, cfg: ComposeEvalConfig, say) -> Family:
    from prefixtune.data import load_data
    from prefixtune.eval.run_eval import method_from_adapters, resolve_adapters

    folders = resolve_adapters(store, name)
    manifest = read_manifest(next(iter(folders.values())))
    if len(folders) < 2 or manifest is None or manifest.label is None:
        raise StoreError(f"--compose {name}: needs a per-label family {name}-<label> (train it with --per-label)")
    hp = manifest.hyperparams or {}
    source = source or (manifest.dataset or {}).get("source")
    if not source:
        raise DataError(f"--compose {name}: no training data recorded. Fix: pass --compose-data")
    data = load_data(source, hp.get("text_field") or "text", hp.get("label_field", "label"), hp.get("label_names"))
    data.split(cfg.split)
    method = method_from_adapters(name, folders, data.labels)
    judge = load_judge(data, None, say)
    check_judge_labels(judge, [label for label in method.labels if label is not None])
    return Family(name, method, data, judge)


def _sample(lm, prompts: list[str], adapters: list, seeds: list[int], cfg: ComposeEvalConfig, desc: str,
            mode: str | None = None, chat: bool = False, best_of: int | None = None) -> list[str]:
    # Each part (or adapter alone) is guided against its own negative, never --guidance-negative; the prompting
    # baseline's rows run the base model, unguided.
    return generate_texts(lm, prompts, adapters, seeds, replace(cfg, guidance_negative=None), desc,
                          guidance_scale=OFF if chat else None, compose_mode=mode, chat=chat,
                          compose_weights=cfg.weights if mode == "guidance" else None, best_of=best_of)


def _score(families: list[Family], combos: list[tuple[str, ...]], texts: list[str], per: int) -> dict[str, Any]:
    """Per-aspect and joint accuracy, per-combination joint accuracy, and the samples' length and diversity."""
    judged = [f.judge.predict(texts) for f in families]  # per family, per sample
    wanted = [combo for combo in combos for _ in range(per)]
    right = [[w[i] == judged[i][s] for i in range(len(families))] for s, w in enumerate(wanted)]
    table = {}
    for c, combo in enumerate(combos):
        rows = right[c * per:(c + 1) * per]
        table["+".join(combo)] = {"joint": statistics.mean(all(r) for r in rows),
                                  **{f.name: statistics.mean(r[i] for r in rows) for i, f in enumerate(families)}}
    stats = sample_stats(texts, [w[0] for w in wanted])
    return {"aspects": {f.name: statistics.mean(r[i] for r in right) for i, f in enumerate(families)},
            "joint": statistics.mean(all(r) for r in right), "mean_words": stats["mean_words"],
            "distinct_2": stats["distinct_2"], "degenerate": stats["degenerate"], "samples": len(texts),
            "combinations": table,
            "examples": [{"labels": list(w), "judged": [j[s] for j in judged], "text": texts[s]}
                         for s, w in enumerate(wanted)]}


def _methods(lm, families: list[Family], combos: list[tuple[str, ...]], cfg: ComposeEvalConfig, say):
    """(name, texts) of every method measured, the composed ones first."""
    seeds = sample_seeds(cfg)
    prompt = {combo: start_prompt(lm, families[0].method.prompts[combo[0]]) for combo in combos}
    rows = [(combo, seed) for combo in combos for seed in seeds]
    prompts = [prompt[c] for c, _ in rows]
    # One sample stream per (combination, i) shared by every method: differences come from the conditioning.
    row_seeds = [seed + 1000 * combos.index(combo) for combo, seed in rows]
    parts = [tuple(f.method.adapter(label) for f, label in zip(families, c)) for c, _ in rows]
    for method in [m for m in cfg.methods if m in (*MODES, "best")]:
        mode, best_of = ("guidance", cfg.best_of) if method == "best" else (method, None)
        name = f"composed ({mode}, best of {best_of})" if best_of else f"composed ({mode})"
        say(f"{name}: {len(rows)} samples")
        yield name, _sample(lm, prompts, parts, row_seeds, cfg, f"compose {method}", mode, best_of=best_of)
    for i, fam in enumerate(families if "alone" in cfg.methods else []):
        alone = [fam.method.adapter(c[i]) for c, _ in rows]
        own = [start_prompt(lm, fam.method.prompts[c[i]]) for c, _ in rows]
        say(f"{fam.name} adapter alone: {len(rows)} samples")
        yield f"{fam.name} alone", _sample(lm, own, alone, row_seeds, cfg, f"{fam.name} alone")
    if "prompting" not in cfg.methods:
        return
    asks = [cfg.instruction.format(*c) for c, _ in rows]
    say(f"prompting {lm.loaded.name} with both attributes: {len(rows)} samples")
    yield "prompting", _sample(lm, asks, [None] * len(rows), row_seeds, cfg, "prompting", chat=True)


def run_compose_eval(cfg: ComposeEvalConfig, say=print) -> dict[str, Any]:
    """Sample and judge every combination; writes compose.json and compose.md under cfg.out."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model
    from prefixtune.store import default_store

    if len(cfg.families) < 2:
        raise DataError("--compose needs two or more families, comma-separated (e.g. --compose emotion,agnews)")
    if cfg.data is not None and len(cfg.data) != len(cfg.families):
        raise DataError(f"--compose-data names {len(cfg.data)} sources for {len(cfg.families)} families; give one "
                        "per family, in the same order")
    if cfg.weights is not None and len(cfg.weights) != len(cfg.families):
        raise DataError(f"--compose-weights gives {len(cfg.weights)} scales for {len(cfg.families)} families; give "
                        "one per family, in the same order")
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown or not cfg.methods:
        raise DataError(f"--compose-methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    if not isinstance(cfg.best_of, int) or cfg.best_of < 2:
        raise DataError(f"--best-of {cfg.best_of}: the best method draws 2 or more samples per row")
    store = AdapterStore(cfg.store or default_store())
    families = [_family(store, name, cfg.data[i] if cfg.data else None, cfg, say)
                for i, name in enumerate(cfg.families)]
    combos = list(itertools.product(*(f.labels for f in families)))
    first = read_manifest(store.path(families[0].method.adapter(families[0].labels[0])))
    loaded = load_base_model(cfg.model or first.base_model, cfg.device, cfg.dtype)
    lm = PrefixLM(loaded, store)
    per = cfg.samples_per_label
    say(f"{len(combos)} combinations x {per} samples, judged by {', '.join(f.name for f in families)}'s judges")
    results = {name: _score(families, combos, texts, per) for name, texts in _methods(lm, families, combos, cfg, say)}
    real = {}
    for f in families:
        texts = [ex.text for ex in real_sample(f.data, cfg.split, f.labels, per, cfg.seed)]
        real[f.name] = {k: v for k, v in sample_stats(texts, [None] * len(texts)).items() if k != "label_word"}
    report = {"families": cfg.families, "model": loaded.name, "split": cfg.split, "combinations": len(combos),
              "samples_per_combination": per, "config": asdict(cfg), "real": real, "results": results,
              "judges": {f.name: describe_judge(f.judge) for f in families},
              "ceilings": {f.name: getattr(f.judge, "macro_accuracy", None) for f in families}}
    out = Path(cfg.out or Path("runs") / "eval" / ("compose-" + "-".join(cfg.families)))
    write_json(out / "compose.json", report)
    atomic_write_text(out / "compose.md", compose_markdown(report))
    say(f"wrote {out / 'compose.json'} and {out / 'compose.md'}")
    return report


def compose_markdown(report: dict[str, Any]) -> str:
    """The summary table (one row per method, then real text), then the per-combination table."""
    fams, results = report["families"], report["results"]
    ceil = ", ".join(f"{f} {fmt(report['ceilings'][f], '{:.2f}')}" for f in fams)
    lines = [f"# Composition: {' + '.join(fams)}", "",
             f"{report['combinations']} combinations x {report['samples_per_combination']} samples on "
             f"{report['model']}; each aspect judged by its family's judge (accuracy on real {report['split']} "
             f"text, the ceiling: {ceil}).", "",
             "| method | " + " | ".join(f"{f} acc" for f in fams) + " | joint | words | distinct-2 | degenerate |",
             "|---" * (len(fams) + 5) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['aspects'][f]:.2f}" for f in fams)
                     + f" | {r['joint']:.2f} | {r['mean_words']:.1f} | {r['distinct_2']:.2f} | "
                       f"{r['degenerate']:.1%} |")
    for f in fams:
        real = report["real"][f]
        lines.append(f"| real {f} text | " + " | ".join("" for _ in fams)
                     + f" | | {real['mean_words']:.1f} | {real['distinct_2']:.2f} | {real['degenerate']:.1%} |")
    lines += ["", "Joint accuracy per combination:", "",
              "| combination | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for combo in next(iter(results.values()))["combinations"]:
        lines.append(f"| {combo} | " + " | ".join(f"{r['combinations'][combo]['joint']:.2f}"
                                                 for r in results.values()) + " |")
    return "\n".join(lines) + "\n"
