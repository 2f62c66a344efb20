"""`accelerate launch` with 2 CPU processes (gloo) runs the unchanged CLI: a sharded family equals each adapter
trained alone, and DDP equals one process with the same global batch.

`--multi_gpu` picks accelerate's torchrun launcher; with no GPU the processes fall back to the CPU and gloo
(`--cpu` alone would start a single process). Each launched process runs on one thread.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import prefixtune
from prefixtune.adapter_folder import read_manifest
from prefixtune.cli import app
from prefixtune.prefix.peft_io import load_adapter

LABELS = ("joy", "anger", "fear", "sadness")


def _launch(tmp_path: Path, args: list[str]) -> str:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefixtune", "train", *args]
    # The launched processes import the prefixtune under test, wherever it lives.
    source = str(Path(prefixtune.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFIXTUNE_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _alone(args: list[str]) -> None:
    """The same command in this one process."""
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def _flat(folder: Path) -> torch.Tensor:
    return load_adapter(folder).flat


def test_sharded_family_equals_each_adapter_trained_alone(tmp_path, tiny_model_dir, emotion_dir):
    # The recipe's family adapter, {label_words} init and word weight need the whole family: without them it shards.
    common = ["--model", str(tiny_model_dir), "--data", str(emotion_dir), "--per-label", "--family-rate", "0",
              "--init-text", "i feel {label} because", "--label-word-weight", "1",
              "--max-examples", "24", "--eval-examples", "8", "--max-steps", "3", "--eval-every", "2",
              "--batch-size", "4", "--num-virtual-tokens", "4", "--no-progress"]
    out, store = tmp_path / "run", tmp_path / "store"
    log = _launch(tmp_path, [*common, "--labels", ",".join(LABELS), "--out", str(out), "--store", str(store)])
    assert "each trained alone, over 2 process(es)" in log
    assert "ranks agree" not in log, "sharded ranks exchange no gradients"
    assert len(re.findall(r"^ +processes +2$", log, re.M)) == 1, "rank 0 alone merges and reports the family"
    names = [f"emotion-{label}" for label in LABELS]
    ranks = [json.loads((out / "shards" / name / "result.json").read_text())["rank"] for name in names]
    assert sorted(ranks) == [0, 0, 1, 1], "each rank trained two adapters"
    for label in LABELS:
        name = f"emotion-{label}"
        _alone([*common, "--labels", label, "--out", str(tmp_path / f"alone-{label}")])
        alone = tmp_path / f"alone-{label}"
        torch.testing.assert_close(_flat(store / name), _flat(alone / "best" / name))
        torch.testing.assert_close(_flat(out / "last" / name), _flat(alone / "last" / name))
        assert read_manifest(store / name).label == label


def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, emotion_dir):
    # 17 rows in batches of 8: steps of 8, 8 and 1 rows. Each rank takes half of a step's rows in micro-batches
    # of 2 (so no_sync skips all but the last exchange); in the 1-row step rank 0 has only a row that scores
    # nothing, and the loss is still the global per-token mean.
    common = ["--model", str(tiny_model_dir), "--data", str(emotion_dir), "--labels", "joy,anger",
              "--max-examples", "17", "--eval-examples", "8", "--max-steps", "3", "--eval-every", "0",
              "--batch-size", "8", "--micro-batch-size", "2", "--num-virtual-tokens", "4", "--lr", "1e-2",
              "--no-progress"]
    log = _launch(tmp_path, [*common, "--out", str(tmp_path / "ddp")])
    assert "ranks agree: 2 processes" in log
    assert log.count("training summary") == 1, "only rank 0 reports and saves"
    _alone([*common, "--out", str(tmp_path / "one")])
    ddp, one = tmp_path / "ddp" / "last" / "emotion", tmp_path / "one" / "last" / "emotion"
    torch.testing.assert_close(_flat(ddp), _flat(one), rtol=1e-4, atol=1e-6)
    assert not torch.equal(_flat(one), torch.zeros_like(_flat(one)))
    losses = [[r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for run in (tmp_path / "ddp", tmp_path / "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), "the logged loss is the global per-token mean too"
