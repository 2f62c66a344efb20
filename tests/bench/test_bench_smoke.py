"""`prefixtune bench` end to end on a tiny model: every section runs and reports its ratio."""

from __future__ import annotations

import json
import math

import pytest

from typer.testing import CliRunner

from prefixtune.cli import app


def test_bench_reports_ratios(tmp_path, tiny_model_dir, emotion_dir):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--data", str(emotion_dir),
                                      "--steps", "2", "--rows", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    speed = {r["method"]: r["tokens_per_s"] for r in report["train"]["results"]}
    assert set(speed) == {"prefixtune", "peft+trainer (pad 128)"}
    # The reported speedup is ours over the peer's, in real tokens per second, from the same run.
    assert report["train"]["speedup"] == pytest.approx(speed["prefixtune"] / speed["peft+trainer (pad 128)"])
    serve = report["serve"]
    assert all(isinstance(serve[k], float) and math.isfinite(serve[k]) and serve[k] > 0
               for k in ("prefixtune continuous", "peft grouped", "n>1 shared prefill speedup"))
    assert (out / "train_tokens_per_s.png").is_file() and (out / "serve_tokens_per_s.png").is_file()


def test_end_to_end_training_bench(tmp_path, tiny_model_dir, emotion_dir):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--data", str(emotion_dir),
                                      "--rows", "16", "--sections", "e2e", "--out", str(out)])
    assert result.exit_code == 0, result.output
    e2e = json.loads((out / "results.json").read_text())["e2e"]
    # Ratios are the peer's seconds over ours (wall and CPU), as the table prints them.
    assert e2e["ratio"] == pytest.approx(e2e["peer_seconds"] / e2e["ours_seconds"])
    assert e2e["cpu_ratio"] == pytest.approx(e2e["peer_cpu_seconds"] / e2e["ours_cpu_seconds"])
    assert e2e["ours_eval_loss"] > 0 and e2e["peer_eval_loss"] > 0
    assert {"load", "train", "eval", "save"} <= set(e2e["peer_phases"])
    assert (out / "train_e2e_seconds.png").is_file()
