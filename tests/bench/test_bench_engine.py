"""`prefixtune bench engine` end to end on the tiny model: every table runs and its ratios are of its own
measurements; the bf16 table is skipped on a CPU without native bf16 and runs when forced."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.runtime import BF16_ENV

QUICK = ["bench", "engine", "--batches", "1,2", "--new-tokens", "3", "--prefill-tokens", "8", "--prefix-lengths",
         "0,4", "--repeats", "1", "--no-compile", "--no-served"]


def test_bench_engine_reports_every_table(tmp_path, monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    result = CliRunner().invoke(app, [*QUICK, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "engine.json").read_text())
    assert set(report["decode"]) == {"batch 1", "batch 2"}
    row = report["decode"]["batch 2"]
    assert row["bare"] > 0 and row["engine"] > 0 and row["served"] is None
    assert f"({row['engine'] / row['bare']:.2f}x)" in result.output  # the printed ratio is of these figures
    assert "skipped: no bf16 on" in result.output and "skipped" in report["bf16"]
    q = report["quantized"]
    assert 0 <= q["int8"]["greedy agreement"] <= 1 and q["fp16"]["greedy agreement"] == 1  # fp16: no drift
    fp16 = q["fp16"]["batch 2"]
    assert f"fp16 {fp16:7.1f} tok/s = {fp16 / q['float32 batch 2']:.2f}x" in result.output  # ratio of these figures
    assert set(report["prefix"]["batch 2"]) == {"0", "4"}  # JSON keys
    assert report["prefill"]["engine"] > 0 and "compiled" not in report


def test_bench_engine_forced_bf16_runs_the_bf16_table(tmp_path, monkeypatch):
    monkeypatch.setenv(BF16_ENV, "1")
    result = CliRunner().invoke(app, [*QUICK, "--no-quantize", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    bf16 = json.loads((tmp_path / "engine.json").read_text())["bf16"]
    assert bf16["decode batch 2"]["bfloat16"] > 0 and bf16["prefill"]["bfloat16"] > 0
    assert "bf16 decode batch" in result.output


@pytest.mark.parametrize("flag", [["--batches", "0"], ["--prefix-lengths", "x"]])
def test_bad_lists_are_usage_errors(flag):
    result = CliRunner().invoke(app, ["bench", "engine", *flag])
    assert result.exit_code == 2 and flag[0] in result.output
