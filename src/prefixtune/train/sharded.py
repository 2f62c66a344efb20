"""A per-label family trained apart: rank r of `accelerate launch` trains its own adapters, each alone, exactly as
a one-process run of its label alone (`--labels LABEL`) would; rank 0 merges them into one run at the end.

OUT/shards/NAME is each adapter's own run folder (run.json, checkpoint, log, loss curve, best/, last/); its
`result.json`, written last, marks it complete. `--resume` skips complete adapters and resumes the others
from their checkpoints on whichever rank the deal now gives them, with any number of processes. Only when
every adapter is complete does rank 0 copy them into OUT/last and OUT/best and publish them all to the store
together, as a one-process run does (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefixtune.data import DataBundle, DataError
from prefixtune.fileio import atomic_folder, atomic_write_text
from prefixtune.train.config import TrainConfig
from prefixtune.train.distributed import deal, load_device
from prefixtune.train.interrupt import Interrupted
from prefixtune.train.loop import TrainResult, train_one
from prefixtune.train.plan import check_adapter_names, load_run_data
from prefixtune.train.preflight import RUN_FILE, SHARDS_DIR, check_out, claim_out, resume_command
from prefixtune.train.report import format_summary
from prefixtune.train.saving import publish

RESULT_FILE = "result.json"  # in OUT/shards/NAME: the adapter's run completed (what it kept, its summary)


def family_jobs(cfg: TrainConfig, data: DataBundle) -> dict[str, tuple[str, float]]:
    """Adapter name -> (its label, its expected cost) for every adapter of the family; bad labels or names
    are refused here, before OUT is claimed."""
    if data.labels is None:
        raise DataError(f"--per-label needs labelled data; {cfg.data} has no '{cfg.label_field}' field")
    labels = cfg.labels or data.labels
    rows = Counter(ex.label for ex in data.split("train"))
    jobs: dict[str, tuple[str, float]] = {}
    for label in labels:
        if not rows[label]:
            raise DataError(f"--labels {label}: no training rows with that label in {cfg.data} "
                            f"(labels: {', '.join(sorted(rows))})")
        name = f"{cfg.name}-{label}"
        # With --max-steps every adapter runs the same steps; else its steps grow with its rows.
        jobs[name] = (label, 1.0 if cfg.max_steps else float(min(rows[label], cfg.max_examples or rows[label])))
    check_adapter_names(jobs)
    return jobs


def job_config(cfg: TrainConfig, label: str, folder: Path, show_progress: bool) -> TrainConfig:
    """The settings of one adapter's own run: the family's, for its label alone, in its own folder."""
    return replace(cfg, labels=[label], out=str(folder), store=None, overwrite=False,
                   progress=cfg.progress and show_progress)


def is_complete(out: Path, name: str) -> bool:
    return (out / SHARDS_DIR / name / RESULT_FILE).is_file()


def train_sharded(cfg: TrainConfig, accelerator, loaded=None, data=None, say=print) -> TrainResult:
    """Train this rank's adapters of the family; on rank 0, merge and publish them once all are complete."""
    from prefixtune.models import load_base_model

    rank, processes = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out).expanduser()
    if rank == 0:
        check_out(cfg, sharded=True)
    loaded = loaded or load_base_model(cfg.model, load_device(cfg, accelerator), cfg.dtype)
    data = data or load_run_data(cfg)
    jobs = family_jobs(cfg, data)
    dealt = deal({name: cost for name, (_, cost) in jobs.items()}, processes)
    if rank == 0:
        claim_out(cfg, cfg.resume and (out / RUN_FILE).is_file(), say)
        say(f"{len(jobs)} adapters, each trained alone, over {processes} process(es): "
            + "; ".join(f"rank {r}: {', '.join(names) or 'none'}" for r, names in enumerate(dealt)))
    accelerator.wait_for_everyone()  # OUT is claimed (cleared for a fresh run) before any rank writes into it
    interrupted = Interrupted()
    with interrupted.installed():
        for name in dealt[rank]:
            if interrupted.signal is not None:
                break
            if is_complete(out, name):
                say(f"{name}: complete in {out / SHARDS_DIR / name}, not trained again")
                continue
            folder = out / SHARDS_DIR / name
            job = job_config(cfg, jobs[name][0], folder, show_progress=rank == 0)
            result = train_one(job, accelerator, loaded, data, lambda msg, n=name: say(f"[{n}] {msg}"), ddp=False,
                               resume_hint=f"{resume_command(cfg)} (the whole family)")
            if result.interrupted:
                break
            record = {"rank": rank, "kept": result.adapters[name].parent.name, "summary": result.summary,
                      "warnings": result.warnings}
            atomic_write_text(folder / RESULT_FILE, json.dumps(record, indent=1))
        accelerator.wait_for_everyone()  # Ctrl-C while waiting for the other ranks only sets the flag
    missing = [name for name in jobs if not is_complete(out, name)]
    if rank != 0 or missing:
        if rank == 0:
            store = f"; {cfg.store} is untouched" if cfg.store else ""
            say(f"interrupted: {len(jobs) - len(missing)} of {len(jobs)} adapters complete (not: "
                f"{', '.join(missing)}){store}. Continue with: {resume_command(cfg)} (any number of processes)")
        return TrainResult(out, {}, {}, bool(missing), [])
    return merge(cfg, out, list(jobs), processes, say)


def merge(cfg: TrainConfig, out: Path, names: list[str], processes: int, say=print) -> TrainResult:
    """Copy every adapter's last/ and best/ into OUT (again, if a killed merge left some), then publish."""
    records = {name: json.loads((out / SHARDS_DIR / name / RESULT_FILE).read_text()) for name in names}
    kept: dict[str, Path] = {}
    for name, record in records.items():
        for kind in ("last", "best"):
            source = out / SHARDS_DIR / name / kind / name
            if source.is_dir():
                with atomic_folder(out / kind / name) as tmp:
                    shutil.copytree(source, tmp, dirs_exist_ok=True)
        kept[name] = out / record["kept"] / name
    summary = family_summary([r["summary"] for r in records.values()], processes)
    if cfg.store:
        kept = publish(cfg.store, kept, say)
    say(format_summary(summary))
    warnings = [f"{name}: {w}" for name, r in records.items() for w in r["warnings"]]
    return TrainResult(out, kept, summary, False, warnings)


def family_summary(parts: list[dict[str, Any]], processes: int) -> dict[str, Any]:
    """One summary for the family from its adapters' own runs."""
    def total(key: str) -> float:
        return sum(p[key] for p in parts)

    seconds = total("train seconds")
    return {
        "adapters": len(parts),
        "processes": processes,
        "steps (all adapters)": total("steps"),
        "train rows": total("train rows"),
        "trainable params": total("trainable params"),
        "adapter file bytes": parts[0]["adapter file bytes"],
        "all adapters bytes": total("all adapters bytes"),
        "train seconds (all ranks)": seconds,
        "real tokens/s (per rank)": sum(p["real tokens/s"] * p["train seconds"] for p in parts) / max(seconds, 1e-9),
        "best eval loss (mean)": total("best eval loss") / len(parts),
        "peak memory MB": max(p["peak memory MB"] for p in parts),
        "truncated examples": total("truncated examples"),
    }
