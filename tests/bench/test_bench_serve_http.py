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
    assert all(r["errors"] == 0 and r["tokens"] > 0 for r in report["runs"])
    assert report["mixed / base"]["2"] > 0 and report["max_tokens=1 requests/s"]["ratio"] > 0
    assert report["stop strings"]["4x20KB status"] == [400] and report["stop strings"]["4x256 status"] == [200]
    over_http = report["engine over HTTP vs bare loop"]
    assert over_http["engine / bare"] > 0
    for server in ("engine process", "single process"):  # the default server and the in-process one, same run
        for how in ("streamed", "not streamed"):
            assert over_http[f"{server} {how} / bare"] > 0 and over_http[f"{server} {how} / bare (CPU)"] > 0
    engine = report["engine vs bare loop"]
    assert engine["engine / bare"] > 0 and engine["engine in this process / bare"] > 0


def test_serve_refuses_a_zero_queue_as_a_usage_error():
    result = CliRunner().invoke(app, ["serve", "--max-queue", "0"])
    assert result.exit_code == 2 and "--max-queue" in result.output
