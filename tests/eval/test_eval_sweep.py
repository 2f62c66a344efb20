"""`prefixtune eval --sweep` end to end on a tiny trained family: one row per temperature x top-p cell, each
with every figure, the table in eval.md and the heat-map PNG (the tiny model is random: shape, not quality)."""

from __future__ import annotations

import json

from evalhelpers import LABELS

PNG = b"\x89PNG\r\n\x1a\n"


def test_eval_sweep_samples_every_cell(trained_store, eval_home, cli, tmp_path):
    s, out = trained_store, tmp_path / "sweep"
    result = cli(["eval", "--adapter", "emotion", "--store", s["store"], "--data", s["data"], "--out", out,
                  "--samples-per-label", "2", "--max-new-tokens", "5", "--latency-repeats", "0", "--no-progress",
                  "--device", "cpu", "--sweep", "--sweep-temperatures", "0.7,1", "--sweep-top-ps", "0.9,0.95,1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    rows = report["sampling_sweep"]
    assert [(r["temperature"], r["top_p"]) for r in rows] == [(t, p) for t in (0.7, 1.0) for p in (0.9, 0.95, 1.0)]
    for r in rows:
        assert r["n"] == 2 * len(LABELS) and sorted(r["per_label"]) == LABELS
        assert 0 <= r["worst_label"] <= r["accuracy"] <= 1 and 0 <= r["distinct_2"] <= 1
        assert 0 <= r["degenerate"] <= 1 and r["mean_words"] >= 0
        expected = (r["accuracy"] >= 0.8 and r["worst_label"] >= 0.6 and r["distinct_2"] >= 0.7
                    and r["degenerate"] <= 0.05)
        assert r["meets"] is expected
    # The cell at T 1, top-p 1 draws what a plain eval at those settings draws (same seeds, same samples).
    plain = [json.loads(line)["text"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [plain[i * 2] for i in range(len(LABELS))] == list(rows[-1]["examples"].values())
    md = (out / "eval.md").read_text()
    assert "## Sampling sweep: temperature x top-p" in md and "| 0.7 | 0.95 |" in md and "| 1 | 1 |" in md
    assert (out / "sampling_sweep.png").read_bytes().startswith(PNG)

    bad = cli(["eval", "--adapter", "emotion", "--store", s["store"], "--data", s["data"], "--out", out,
               "--sweep", "--sweep-top-ps", "0.9,1.5", "--device", "cpu"])
    assert bad.exit_code != 0 and "--sweep-top-ps [1.5]" in bad.output
