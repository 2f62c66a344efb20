"""`prefixtune eval` end to end on trained tiny adapters: a per-label family and a label-in-prompt adapter."""

from __future__ import annotations

import json

from evalhelpers import LABELS

# Small generation settings: the tiny model is random, what matters is that every number is produced.
FAST = ["--samples-per-label", "3", "--max-new-tokens", "6", "--latency-tokens", "4", "--latency-repeats", "1",
        "--no-progress", "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_eval_family_reports_per_label_accuracy_and_confusion_matrix(trained_store, eval_home, cli, tmp_path):
    s = trained_store
    out = tmp_path / "report"
    # Below temperature 1: the random tiny model's distribution is nearly flat over 49k tokens, so at 1 the same
    # seed can draw the same token under slightly different adapters; sharper, their differences show.
    result = cli(["eval", "--adapter", "emotion", "--store", s["store"], "--data", s["data"], "--out", out, *FAST,
                  "--temperature", "0.8", "--top-p", "0.95"])
    assert result.exit_code == 0, result.output
    assert "conditioning accuracy" in result.output
    report = json.loads((out / "eval.json").read_text())
    assert sorted(report["adapters"]) == [f"emotion-{label}" for label in LABELS]
    r = report["result"]
    assert r["eval_rows"] == 12 and r["eval_tokens"] > 0 and r["eval_loss"] > 0 and r["perplexity"] > 1
    cond = r["conditioning"]
    assert cond["labels"] == LABELS and sorted(cond["per_label"]) == LABELS
    assert all(0.0 <= v <= 1.0 for v in cond["per_label"].values())
    assert sum(map(sum, cond["confusion"])) == cond["samples"] == 3 * len(LABELS)  # the judge only knows LABELS
    for i, label in enumerate(LABELS):  # the diagonal agrees with the per-label accuracy
        assert cond["confusion"][i][i] == round(cond["per_label"][label] * 3)
    assert (out / "confusion.png").read_bytes().startswith(PNG)
    assert report["judge"]["accuracy"] == 1.0 and report["judge"]["accuracy_split"] == "test"
    md = (out / "eval.md").read_text()
    assert "confusion.png" in md and all(f"| {label} |" in md for label in LABELS)
    assert 0 <= r["distinct_1"] <= 1 and 0 <= r["distinct_2"] <= 1 and r["copy_rate"] is not None
    assert r["latency_ms_per_token"] > 0 and r["base_latency_ms_per_token"] > 0
    assert isinstance(r["latency_overhead_pct"], float) and r["prefix_length"] == 4

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["adapter"] for x in samples] == [f"emotion-{label}" for label in LABELS for _ in range(3)]
    # Every label's prompt is the same "Text:" and sample i uses the same seed for every label, so identical
    # texts across labels would mean the mixed batch applied one adapter to every row.
    for i in range(3):
        texts = {x["text"] for x in samples[i::3]}
        assert len(texts) > 1, f"sample {i} is identical for every label: adapters were not applied per row"


def test_eval_single_adapter_with_custom_judge_and_references(trained_store, eval_home, cli, tmp_path,
                                                              monkeypatch):
    (tmp_path / "always_joy_judge.py").write_text(
        "class J:\n"
        "    name = 'always-joy'\n"
        "    def predict(self, texts): return ['joy'] * len(texts)\n"
        "def make(): return J()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s, out = trained_store, tmp_path / "single"
    result = cli(["eval", "--adapter", "single", "--store", s["store"], "--data", s["data"], "--out", out,
                  "--judge", "always_joy_judge:make", "--reference-field", "ref", "--reference-rows", "4",
                  "--temperature", "0", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    r = report["result"]
    cond = r["conditioning"]
    assert cond["per_label"] == {"anger": 0.0, "fear": 0.0, "joy": 1.0}
    assert cond["accuracy"] == 1 / 3
    joy = LABELS.index("joy")
    assert [row[joy] for row in cond["confusion"]] == [3, 3, 3] and sum(map(sum, cond["confusion"])) == 9
    assert report["judge"] == {"name": "always-joy"}  # no self-reported accuracy: none is claimed
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {x["adapter"] for x in samples} == {"single"}
    refs = r["references"]
    assert refs["rows"] == 4 and all(0 <= refs[k] <= 100 for k in ("bleu", "chrf", "rouge_l"))
    assert refs["examples"][0]["prompt"].startswith("Emotion: ")  # the training template, label filled in
    assert "BLEU" in (out / "eval.md").read_text()


def test_eval_plain_text_adapter_scores_references_without_a_template(trained_store, eval_home, cli, tmp_path):
    s, out = trained_store, tmp_path / "plain"
    result = cli(["eval", "--adapter", "plain", "--store", s["store"], "--data", s["plain"], "--out", out,
                  "--reference-field", "ref", "--temperature", "0", *FAST])
    assert result.exit_code == 0, result.output
    r = json.loads((out / "eval.json").read_text())["result"]
    assert r["conditioning"] is None and r["eval_rows"] == 4  # no labels: nothing to judge, loss still scored
    assert len(r["samples"]) == 3 and all(x["label"] is None for x in r["samples"])
    refs = r["references"]
    assert refs["rows"] == 4 and [e["prompt"] for e in refs["examples"]] == [f"plain test {i}" for i in range(4)]
    assert [e["reference"] for e in refs["examples"]] == [f"ref {i}" for i in range(4)]


def test_eval_errors_are_one_line(trained_store, eval_home, cli, tmp_path):
    s = trained_store
    result = cli(["eval", "--adapter", "nope", "--store", s["store"], "--data", s["data"], *FAST])
    assert result.exit_code == 2 and "no adapter 'nope'" in result.output and "emotion-joy" in result.output
    result = cli(["eval", "--adapter", "single", "--store", s["store"], "--data", s["data"], "--split", "dev2",
                  *FAST])
    assert result.exit_code == 2 and "no 'dev2' split" in result.output
    result = cli(["eval", "--adapter", "single", "--store", s["store"], "--data", s["data"], "--judge", "nojudge",
                  *FAST])
    assert result.exit_code == 2 and "module:factory" in result.output
