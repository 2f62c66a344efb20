"""`accelerate launch` (DDP, 2 CPU processes over gloo) runs the unchanged CLI; ranks agree, rank 0 saves.

`--multi_gpu` picks accelerate's torchrun launcher; with no GPU the processes fall back to the CPU and gloo
(`--cpu` alone would start a single process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefixtune.store import read_manifest


def test_two_process_ddp_training(tmp_path, tiny_model_dir, emotion_dir):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "run"
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefixtune", "train",
        "--model", str(tiny_model_dir), "--data", str(emotion_dir), "--out", str(out),
        "--per-label", "--labels", "joy,anger", "--max-examples", "64", "--eval-examples", "16",
        "--max-steps", "3", "--eval-every", "0", "--num-virtual-tokens", "4", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "ranks agree: 2 processes" in log
    assert log.count("training summary") == 1, "only rank 0 reports and saves"
    for name in ("emotion-joy", "emotion-anger"):
        assert read_manifest(out / "last" / name).hyperparams["max_steps"] == 3
