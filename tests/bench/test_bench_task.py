"""`prefixtune bench task` end to end on a tiny model: both trainers, three methods, greedy and beam, one table."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from prefixtune.cli import app


def test_bench_task_scores_both_prefixes_and_the_base(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"meaning_representation": f"name[P{i % 4}], area[riverside]", "human_reference": f"P{i % 4} is nice."}
            for i in range(16)]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "task", "--model", str(tiny_model_dir), "--data", str(data),
                                      "--steps", "1", "--batch-size", "4", "--items", "2", "--num-beams", "2",
                                      "--num-virtual-tokens", "4", "--max-length", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert set(report["scores"]) == {f"{m} | {d}" for m in ("prefixtune", "peft", "base (no prefix)")
                                     for d in ("greedy", "beam 2")}
    assert all(s["items"] == 2 and 0 <= s["bleu"] <= 100 for s in report["scores"].values())
    assert report["training"]["prefixtune"]["tokens_per_s"] > 0 and report["training"]["peft"]["eval_loss"] > 0
    assert "| prefixtune | greedy |" in (out / "results.md").read_text()
    assert {p.name for p in (out / "adapters").iterdir()} == {"prefixtune", "peft"}
