"""`prefixtune bench` end to end on a tiny model: every section runs and reports its ratio."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from prefixtune.cli import app


def test_bench_reports_ratios(tmp_path, tiny_model_dir, emotion_dir):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--data", str(emotion_dir),
                                      "--steps", "2", "--rows", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["train"]["speedup"] > 0
    assert {r["method"] for r in report["train"]["results"]} == {"prefixtune", "peft+trainer (pad 128)"}
    assert report["serve"]["prefixtune continuous"] > 0 and report["serve"]["peft grouped"] > 0
    assert report["serve"]["n>1 shared prefill speedup"] > 0
    assert (out / "train_tokens_per_s.png").is_file() and (out / "serve_tokens_per_s.png").is_file()


def test_end_to_end_training_bench(tmp_path, tiny_model_dir, emotion_dir):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--data", str(emotion_dir),
                                      "--rows", "16", "--sections", "e2e", "--out", str(out)])
    assert result.exit_code == 0, result.output
    e2e = json.loads((out / "results.json").read_text())["e2e"]
    assert e2e["ours_seconds"] > 0 and e2e["peer_seconds"] > 0 and e2e["ratio"] > 0
    assert e2e["ours_cpu_seconds"] > 0 and e2e["peer_cpu_seconds"] > 0 and e2e["cpu_ratio"] > 0
    assert e2e["ours_eval_loss"] > 0 and e2e["peer_eval_loss"] > 0
    assert {"load", "train", "eval", "save"} <= set(e2e["peer_phases"])
    assert (out / "train_e2e_seconds.png").is_file()
