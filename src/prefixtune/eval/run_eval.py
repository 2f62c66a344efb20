"""`prefixtune eval`: one stored adapter (label in the prompt) or a per-label family, on one split."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefixtune.adapter_folder import Manifest, StoreError, read_manifest
from prefixtune.data import DataBundle, DataError
from prefixtune.eval.evaluate import EvalSettings, Method, evaluate_method
from prefixtune.eval.judge import describe_judge, load_judge
from prefixtune.eval.quality import choose_scale, plot_sweep
from prefixtune.eval.report import eval_markdown, plot_confusion, write_json
from prefixtune.eval.sweep import SWEEP_TEMPERATURES, SWEEP_TOP_PS, check_grid, plot_sampling_sweep, sampling_sweep, \
    sweep_markdown
from prefixtune.fileio import atomic_write_text
from prefixtune.store import AdapterStore
from prefixtune.templates import fill_template, is_task_template

__all__ = ["EvalConfig", "method_from_adapters", "resolve_adapters", "run_eval"]


@dataclass
class EvalConfig(EvalSettings):
    """`prefixtune eval` settings (plus the shared EvalSettings)."""

    adapter: str = ""  # adapter name, or the family name NAME of per-label adapters NAME-<label>
    data: str | None = None  # data to evaluate on (default: the data the adapter was trained on)
    store: str | None = None  # adapter store (default $PREFIXTUNE_HOME/adapters)
    model: str | None = None  # base model (default: the one in the adapter's manifest)
    out: str | None = None  # report folder (default runs/eval/<adapter>)
    text_field: str | None = None  # field holding the text (default: as in training)
    label_field: str | None = None  # field holding the label (default: as in training)
    label_names: list[str] | None = None  # names for integer labels (default: as in training)
    judge: str | None = None  # module:factory of a custom judge (default: TF-IDF + logistic regression)
    save_guidance: bool = False  # write the sweep's best natural-text scale into the adapters' manifests
    sweep: bool = False  # also sample a temperature x top-p grid with the default guidance (table + PNG)
    sweep_temperatures: list[float] = field(default_factory=lambda: list(SWEEP_TEMPERATURES))  # temperatures to sweep
    sweep_top_ps: list[float] = field(default_factory=lambda: list(SWEEP_TOP_PS))  # top-p values to sweep
    device: str | None = None  # cpu | cuda | auto
    dtype: str | None = None  # float32 | bfloat16 | float16 | auto


def resolve_adapters(store: AdapterStore, name: str) -> dict[str, Path]:
    """`name` itself, or every NAME-<label> adapter whose manifest has a label (a per-label family)."""
    if store.exists(name):
        return {name: store.path(name)}
    family = {}
    for other in store.names():
        if other.startswith(f"{name}-"):
            manifest = read_manifest(store.path(other))
            if manifest is not None and manifest.label is not None:
                family[other] = store.path(other)
    if not family:
        known = ", ".join(store.names()) or "none"
        raise StoreError(f"no adapter {name!r} and no per-label adapters {name}-<label> in {store.root} "
                         f"(adapters: {known})")
    return family


def method_from_adapters(name: str, folders: dict[str, Path], labels: list[str] | None) -> Method:
    """How to prompt each label: the training template with the label filled in, and which adapter to use."""
    manifests: dict[str, Manifest] = {}
    for adapter, folder in folders.items():
        manifest = read_manifest(folder)
        if manifest is None:
            raise StoreError(f"{folder}: no prefixtune.json, so its training template is unknown (an imported "
                             f"PEFT adapter?); evaluation needs the template the adapter was trained with")
        manifests[adapter] = manifest
    length = max(int(m.prefix.get("num_virtual_tokens", 0)) for m in manifests.values())
    family = {m.label: a for a, m in manifests.items() if m.label is not None}
    if len(folders) > 1 or family:
        if len(family) != len(folders):
            raise StoreError(f"{name}: mixes per-label adapters with unlabelled ones ({', '.join(folders)})")
        prompts = {label: fill_template(manifests[a].template or "", label) for label, a in sorted(family.items())}
        return Method(name, prompts, dict(sorted(family.items())), length)
    adapter, manifest = next(iter(manifests.items()))
    template = manifest.template or ""
    if "{label}" not in template:  # unconditional adapter: samples, loss and diversity, no judge
        return Method(name, {None: template}, {None: adapter}, length)
    known = manifest.labels or labels
    if not known:
        raise DataError(f"adapter {adapter!r} puts a label in its prompt but neither it nor the data names the "
                        f"labels. Fix: evaluate on its labelled training data")
    return Method(name, {label: fill_template(template, label) for label in known},
                  {label: adapter for label in known}, length)


def _data_settings(cfg: EvalConfig, manifest: Manifest | None) -> dict[str, Any]:
    hp = (manifest.hyperparams if manifest else {}) or {}
    source = cfg.data or (manifest.dataset.get("source") if manifest else None)
    if not source:
        raise DataError("no data to evaluate on. Fix: pass --data (a folder, file or Hub id)")
    return {"source": source, "text_field": cfg.text_field or hp.get("text_field") or "text",
            "label_field": cfg.label_field if cfg.label_field is not None else hp.get("label_field", "label"),
            "label_names": cfg.label_names or hp.get("label_names")}


def _split_files(source: str, split: str) -> list[Path] | None:
    """The files of `split` in a data folder (as data.load_data names them), or None for non-folders."""
    from prefixtune.data import SPLIT_ALIASES

    folder = Path(source).expanduser()
    if not folder.is_dir():
        return None
    canonical = SPLIT_ALIASES.get(split.strip().lower(), split)
    for base in (folder, folder / "data"):
        if base.is_dir():
            files = [p for p in sorted(base.iterdir())
                     if p.is_file() and SPLIT_ALIASES.get(re.sub(r"-\d+-of-\d+$", "", p.stem.lower())) == canonical]
            if files:
                return files
    return None


def load_references(data_kw: dict[str, Any], field: str, split: str, data: DataBundle) -> list[str]:
    """The reference field of every row of `split`, in row order (read as if it were the text field).

    Only the evaluated split's files are read, so training files without references are fine.
    """
    from prefixtune.data import load_data

    kw = (field, data_kw["label_field"], data_kw["label_names"])
    files = _split_files(data_kw["source"], split)
    if files is not None:  # a single file loads as "train": read each file of the split on its own
        texts = [ex.text for f in files for ex in load_data(str(f), *kw).split("train")]
    else:
        texts = [ex.text for ex in load_data(data_kw["source"], *kw).split(split)]
    if len(texts) != len(data.split(split)):
        raise DataError(f"{data_kw['source']}: {len(texts)} references but {len(data.split(split))} rows in "
                        f"'{split}'")
    return texts


def save_guidance(store: AdapterStore, folders: dict[str, Path], lm, result: dict[str, Any], cfg: EvalConfig,
                  say=print) -> dict[str, Any] | None:
    """Record the sweep's chosen scale (and the negative it was measured against) in every adapter evaluated."""
    best = choose_scale(result["guidance_sweep"], (result.get("quality") or {}).get("real"))
    if best is None:
        say("no swept scale keeps natural text (length, distinct-2, degenerate share): nothing recorded")
        return None
    first = next(iter(folders))
    negative = lm.guidance(first, best["guidance_scale"], cfg.guidance_negative)[1]
    guidance = {"scale": best["guidance_scale"], "negative": negative,
                "measured": {"accuracy": best["accuracy"], "mean_words": best["mean_words"],
                             "distinct_2": best["distinct_2"], "split": cfg.split}}
    for name in folders:
        store.set_guidance(name, guidance)
    say(f"recorded guidance x{best['guidance_scale']:g} against {negative or 'the base model'} in "
        f"{len(folders)} manifest(s) (accuracy {best['accuracy']:.3f}, {best['mean_words']:.1f} words)")
    return guidance


def _check_settings(cfg: EvalConfig) -> None:
    """Settings that cannot work, refused before anything loads."""
    if not cfg.adapter:
        raise StoreError("no adapter given. Fix: pass --adapter NAME")
    if cfg.save_guidance and not cfg.guidance_sweep:
        raise DataError("--save-guidance records what a sweep measured: add --guidance-sweep 1,1.5,2,3")
    if cfg.sweep:
        check_grid(cfg.sweep_temperatures, cfg.sweep_top_ps)


def _plots(result: dict[str, Any], cfg: EvalConfig, out: Path) -> dict[str, str]:
    """The confusion matrix and the guidance sweep's PNGs, where the run has them: report key -> file."""
    plots = {}
    if result.get("conditioning"):
        plots["confusion_png"] = str(plot_confusion(result["conditioning"], out / "confusion.png",
                                                    f"{cfg.adapter} ({cfg.split})"))
    if result.get("guidance_sweep"):
        real = (result.get("quality") or {}).get("real")
        plots["guidance_png"] = str(plot_sweep(result["guidance_sweep"], real, out / "guidance_sweep.png",
                                               f"{cfg.adapter}: guidance sweep ({cfg.split})"))
    return plots


def run_eval(cfg: EvalConfig, say=print) -> dict[str, Any]:
    """Evaluate, write eval.json / eval.md / confusion.png / samples.jsonl under cfg.out; returns the report."""
    from prefixtune.data import load_data
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model
    from prefixtune.store import default_store

    _check_settings(cfg)
    store = AdapterStore(cfg.store or default_store())
    folders = resolve_adapters(store, cfg.adapter)
    first = read_manifest(next(iter(folders.values())))
    if first is not None and is_task_template(first.template):  # inputs -> text: scored against references
        from prefixtune.eval.task_eval import run_task_eval

        return run_task_eval(cfg, store, folders, first, say)
    data_kw = _data_settings(cfg, first)
    data = load_data(data_kw["source"], data_kw["text_field"], data_kw["label_field"], data_kw["label_names"])
    data.split(cfg.split)  # fail on a missing split before loading a model
    method = method_from_adapters(cfg.adapter, folders, data.labels)
    if len(folders) > 1:
        say(f"{cfg.adapter}: per-label family of {len(folders)} adapters ({', '.join(folders)})")
    conditioned = any(label is not None for label in method.labels)
    if conditioned and not data.labels:
        raise DataError(f"{data.source} has no labels, so conditioning cannot be judged. Fix: pass the labelled "
                        f"data the adapter was trained on")
    judge = load_judge(data, cfg.judge, say) if conditioned and cfg.samples_per_label > 0 else None
    references = load_references(data_kw, cfg.reference_field, cfg.split, data) if cfg.reference_field else None

    model_name = cfg.model or (first.base_model if first else None)
    if not model_name:
        raise StoreError(f"{cfg.adapter}: no base model recorded. Fix: pass --model")
    loaded = load_base_model(model_name, cfg.device, cfg.dtype)
    lm = PrefixLM(loaded, store)
    # Overhead = the same prompts on the bare base model: what the prefix itself costs per token.
    result = evaluate_method(lm, method, data, cfg, judge, list(method.prompts.values()), None, references, say)

    out = Path(cfg.out or Path("runs") / "eval" / cfg.adapter)
    report = {"adapter": cfg.adapter, "adapters": {k: str(v) for k, v in folders.items()}, "model": model_name,
              "data": data.source, "data_fingerprint": data.fingerprint, "split": cfg.split,
              "judge": describe_judge(judge) if judge is not None else None, "config": asdict(cfg),
              "result": result}
    report.update(_plots(result, cfg, out))
    if cfg.save_guidance:
        report["saved_guidance"] = save_guidance(store, folders, lm, result, cfg, say)
    markdown = eval_markdown(report)
    if cfg.sweep:
        report["sampling_sweep"] = sampling_sweep(lm, method, cfg, judge, cfg.sweep_temperatures, cfg.sweep_top_ps,
                                                  say)
        report["sampling_sweep_png"] = str(plot_sampling_sweep(report["sampling_sweep"], out / "sampling_sweep.png",
                                                               f"{cfg.adapter} ({cfg.split})"))
        markdown += sweep_markdown(report["sampling_sweep"], len(result["samples"]))
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in result["samples"]))
    write_json(out / "eval.json", report)
    atomic_write_text(out / "eval.md", markdown)
    say(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return report
