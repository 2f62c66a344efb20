"""`prefixtune eval --compose A,B` end to end: two trained tiny per-label families, every label combination."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from evalhelpers import LABELS

TOPICS = {"sports": ["match", "team", "goal", "coach"], "world": ["election", "minister", "border", "treaty"]}


def _topic_data(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = random.Random(1)
    for split, n in (("train", 40), ("test", 10)):
        with (root / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                label = sorted(TOPICS)[i % 2]
                f.write(json.dumps({"text": f"news about the {rng.choice(TOPICS[label])} today", "label": label})
                        + "\n")
    return root


def test_compose_eval_reports_every_combination_and_the_baselines(trained_store, eval_home, cli, tmp_path):
    from prefixtune.train.config import TrainConfig
    from prefixtune.train.run import train

    topics = _topic_data(tmp_path / "topics")
    train(TrainConfig(model=str(trained_store["model"]), data=str(topics), store=str(trained_store["store"]),
                      out=str(tmp_path / "run"), name="topic", per_label=True, max_steps=2, batch_size=4,
                      num_virtual_tokens=3, eval_every=0, eval_examples=4, progress=False, device="cpu",
                      dtype="float32", family_rate=0.25), say=lambda *a: None)
    out = tmp_path / "report"
    result = cli(["eval", "--compose", "emotion,topic", "--store", trained_store["store"], "--model",
                  trained_store["model"], "--samples-per-label", "2", "--max-new-tokens", "5", "--out", out,
                  "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compose.json").read_text())
    assert report["combinations"] == len(LABELS) * len(TOPICS)
    results = report["results"]
    assert list(results) == ["composed (guidance)", "composed (guidance, best of 2)", "composed (concat)",
                             "emotion alone", "topic alone", "prompting"]
    for name, r in results.items():
        assert r["samples"] == len(LABELS) * len(TOPICS) * 2, name
        examples = r["examples"]
        # Each aspect judged by its own family's judge: accuracies recomputed from the judged labels.
        for i, family in enumerate(("emotion", "topic")):
            assert r["aspects"][family] == statistics.mean(e["labels"][i] == e["judged"][i] for e in examples)
        assert r["joint"] == statistics.mean(e["labels"] == e["judged"] for e in examples)
        assert r["joint"] <= min(r["aspects"].values())
        assert abs(statistics.mean(c["joint"] for c in r["combinations"].values()) - r["joint"]) < 1e-9
        assert sorted(r["combinations"]) == sorted(f"{e}+{t}" for e in LABELS for t in TOPICS)
    assert set(report["ceilings"]) == {"emotion", "topic"} and report["ceilings"]["topic"] == 1.0
    assert "| composed (guidance) |" in (out / "compose.md").read_text()
    assert "composed (guidance): joint" in result.output


def test_compose_eval_refuses_what_it_cannot_use(trained_store, eval_home, cli):
    result = cli(["eval", "--compose", "emotion", "--store", trained_store["store"]])
    assert result.exit_code != 0 and "two or more families" in result.output
    result = cli(["eval", "--compose", "emotion,single", "--compose-methods", "guidance,stack", "--store",
                  trained_store["store"]])
    assert result.exit_code != 0 and "stack" in result.output
    result = cli(["eval", "--compose", "emotion,single", "--data", "x", "--store", trained_store["store"]])
    assert result.exit_code != 0 and "--data" in result.output
    result = cli(["eval", "--compose", "emotion,single", "--compose-weights", "2", "--store", trained_store["store"]])
    assert result.exit_code != 0 and "--compose-weights gives 1 scales for 2 families" in result.output
    result = cli(["eval", "--compose", "emotion,single", "--compose-weights", "2,x", "--store",
                  trained_store["store"]])
    assert result.exit_code != 0 and "--compose-weights takes comma-separated numbers" in result.output
    result = cli(["eval", "--compose", "emotion,single", "--best-of", "1", "--store", trained_store["store"]])
    assert result.exit_code != 0 and "--best-of 1" in result.output
