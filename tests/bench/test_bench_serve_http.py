"""`prefixtune bench serve --http --tiny` end to end, tiny and short: every figure is produced, no errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefixtune.cli import app


@pytest.mark.slow  # starts three servers (two with an engine process)
def test_bench_serve_http_reports_every_ratio(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "serve", "--http", "--tiny", "--concurrency", "2", "--requests", "2",
                                      "--max-tokens", "2", "--adapters", "8", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert {r["scenario"] for r in report["runs"]} == {"mixed 6 adapters", "base only"}
    for row in report["runs"]:  # 4 requests (at least 2x the concurrency) of exactly 2 tokens (EOS ignored)
        assert row["errors"] == 0 and row["requests"] == 4 and row["tokens"] == 8
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"], rel=0.01, abs=0.1)
    rate = {r["scenario"]: r["tokens"] / r["seconds"] for r in report["runs"]}
    assert report["mixed / base"]["2"] == pytest.approx(rate["mixed 6 adapters"] / rate["base only"], abs=2e-3)
    rps = report["max_tokens=1 requests/s"]
    assert rps["ratio"] == pytest.approx(rps["8 in store"] / rps["6 in store"])
    assert report["stop strings"]["4x20KB status"] == [400] and report["stop strings"]["4x256 status"] == [200]
    over_http = report["engine over HTTP vs bare loop"]
    for server in ("engine process", "single process"):  # the default server and the in-process one, same run
        for how in ("streamed", "not streamed"):
            ratio = over_http[f"{server} {how} tokens/s"] / over_http["bare loop tokens/s"]
            assert over_http[f"{server} {how} / bare"] == pytest.approx(ratio)
            cpu = over_http[f"{server} {how} tokens per CPU s"] / over_http["bare tokens per CPU s"]
            assert over_http[f"{server} {how} / bare (CPU)"] == pytest.approx(cpu)
    assert over_http["engine / bare"] == over_http["engine process streamed / bare"]
    engine = report["engine vs bare loop"]
    assert engine["engine / bare"] == pytest.approx(engine["engine tokens/s"] / engine["bare loop tokens/s"])
    assert engine["engine in this process / bare"] == pytest.approx(
        engine["engine in this process tokens/s"] / engine["bare loop tokens/s"])


def test_serve_refuses_a_zero_queue_as_a_usage_error():
    result = CliRunner().invoke(app, ["serve", "--max-queue", "0"])
    assert result.exit_code == 2 and "--max-queue" in result.output
