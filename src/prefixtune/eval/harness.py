"""lm-evaluation-harness on a served adapter: a multiple-choice task over a local data file, run through the
harness's `local-completions` model (against `prefixtune serve`: echo + logprobs) or its `hf` model (with
`peft=` an exported adapter), and the two runs compared document by document.

lm-eval (`pip install lm-eval`, a dev dependency) is imported only when a run starts: prefixtune itself does not
need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

TASK = "prefixtune_choice"


@dataclass
class HarnessRun:
    """One model's answers on the task."""

    accuracy: float
    answers: list[int]  # per document, the choice with the highest log-likelihood
    loglikelihoods: list[list[float]]  # per document, per choice


def write_choice_task(folder: str | Path, rows: list[dict[str, str]], choices: list[str],
                      text: str = "Text: {{text}}\nEmotion:") -> Path:
    """A multiple-choice task (log-likelihood of each choice after `text`) over rows {"text", "label"}, as a
    task YAML and a jsonl in `folder` (pass the folder to the harness's include_path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "label": choices.index(r["label"])}) + "\n"
                            for r in rows))
    spec = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": text,
            "doc_to_choice": [f" {c}" for c in choices], "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (folder / f"{TASK}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return folder


def run_harness(model: str, model_args: dict[str, Any], task_dir: str | Path) -> HarnessRun:
    """The task of `task_dir` through lm-eval's `model` ("local-completions" or "hf") with its model_args."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          batch_size=1)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    answers = [max(range(len(row)), key=row.__getitem__) for row in scores]
    return HarnessRun(float(out["results"][TASK]["acc,none"]), answers, scores)


def served_args(url: str, model: str, tokenizer: str | Path) -> dict[str, Any]:
    """local-completions against a prefixtune server at `url` (…/v1), tokenizing with the base model's tokenizer."""
    return {"model": model, "base_url": f"{url.rstrip('/')}/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer), "num_concurrent": 1, "max_retries": 1}


def hf_args(pretrained: str | Path, peft: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """The harness's own transformers model, with PEFT's prefix when `peft` is an exported adapter folder."""
    args = {"pretrained": str(pretrained), "dtype": "float32", "device": device}
    if peft is not None:
        args["peft"] = str(peft)
    return args


def largest_gap(a: HarnessRun, b: HarnessRun) -> float:
    """The largest difference between two runs' log-likelihoods of the same document and choice."""
    return max(abs(x - y) for ra, rb in zip(a.loglikelihoods, b.loglikelihoods) for x, y in zip(ra, rb))


def choice_rows(path: str | Path, labels: list[str], per_label: int) -> list[dict[str, str]]:
    """The first `per_label` rows of each label from a jsonl of {"text", "label"} (in file order)."""
    rows, seen = [], dict.fromkeys(labels, 0)
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if seen.get(row["label"], per_label) < per_label:
            seen[row["label"]] += 1
            rows.append(row)
    return rows


@contextmanager
def serving(model: str | Path, store: str | Path, *flags: str, timeout: float = 300.0) -> Iterator[str]:
    """`prefixtune serve` on a free loopback port as a user starts it; yields its URL (…/v1), stops it after."""
    cmd = [sys.executable, "-m", "prefixtune", "serve", "--model", str(model), "--store", str(store), "--port", "0",
           *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    found, url, lines = threading.Event(), [], []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("prefixtune serve: http"):
                url.append(line.split(": ", 1)[1].strip())
                found.set()
        found.set()  # EOF: the server exited

    threading.Thread(target=read, daemon=True).start()
    try:
        found.wait(timeout)
        if not url:
            raise RuntimeError("prefixtune serve printed no URL:\n" + "".join(lines[-20:]))
        yield url[0]
    finally:
        proc.terminate()
        proc.wait(30)
