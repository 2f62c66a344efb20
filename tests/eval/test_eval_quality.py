"""Honest sample quality: degenerate/label-word/length figures beside real text, the judge's ceiling, and the
guidance sweep (table + PNG) through the real `prefixtune eval` CLI."""

from __future__ import annotations

import json

from evalhelpers import LABELS

from prefixtune.eval.quality import degenerate, sample_stats

FAST = ["--samples-per-label", "3", "--max-new-tokens", "6", "--latency-repeats", "0", "--no-progress",
        "--device", "cpu"]


def test_degenerate_means_a_run_of_four():
    assert degenerate("so tired,,,, of this") and degenerate("no no no no way") and degenerate("aaaah")
    assert not degenerate("i feel so so tired") and not degenerate("ok... fine") and not degenerate("")
    assert degenerate("NO no No nO")  # case does not hide a run


def test_sample_stats():
    stats = sample_stats(["i feel angry today", "such joy", "ugh,,,,"], ["anger", "joy", "fear"])
    assert stats["n"] == 3 and stats["mean_words"] == (4 + 2 + 1) / 3
    assert stats["degenerate"] == 1 / 3
    assert stats["label_word"] == 1 / 3  # "angry" is not "anger"; only a whole-word label counts
    assert sample_stats(["a b", "a b"], [None, None])["distinct_2"] == 0.5
    assert sample_stats([], [])["n"] == 0


def test_eval_reports_quality_beside_real_text_and_a_guidance_sweep(trained_store, eval_home, cli, tmp_path):
    s, out = trained_store, tmp_path / "report"
    result = cli(["eval", "--adapter", "emotion", "--store", s["store"], "--data", s["data"], "--out", out,
                  "--guidance-sweep", "1,3", "--guidance-negative", "none", *FAST])
    assert result.exit_code == 0, result.output
    r = json.loads((out / "eval.json").read_text())["result"]
    q = r["quality"]
    assert q["samples"]["n"] == q["real"]["n"] == 3 * len(LABELS)
    for side in ("samples", "real"):
        assert q[side]["mean_words"] > 0 and 0 <= q[side]["distinct_2"] <= 1
        assert q[side]["base_perplexity"] > 1 and 0 <= q[side]["degenerate"] <= 1
    assert q["real"]["label_word"] == 0.0  # the test data says "furious", "scared": never the label itself
    assert sorted(q["ceiling"]["per_label"]) == LABELS and q["real"]["judge_accuracy"] == 1.0
    sweep = r["guidance_sweep"]
    assert [row["guidance_scale"] for row in sweep] == [1.0, 3.0]
    assert all(0 <= row["accuracy"] <= 1 and row["mean_words"] > 0 for row in sweep)
    # Scale 1 is unguided: the sweep's first row samples exactly what the main samples did.
    assert sweep[0]["distinct_2"] == r["distinct_2"]
    assert (out / "guidance_sweep.png").read_bytes().startswith(b"\x89PNG")
    md = (out / "eval.md").read_text()
    assert "Samples beside real text" in md and "Guidance sweep" in md and "real text (9 rows)" in md


def test_bad_sweep_is_a_usage_error(trained_store, eval_home, cli):
    result = cli(["eval", "--adapter", "emotion", "--store", trained_store["store"], "--guidance-sweep", "1,x"])
    assert result.exit_code == 2 and "--guidance-sweep" in result.output


def test_choose_scale_keeps_natural_text():
    from prefixtune.eval.quality import choose_scale

    real = {"mean_words": 20.0}
    rows = [dict(guidance_scale=1.0, accuracy=0.5, mean_words=19, distinct_2=0.8, degenerate=0.0),
            dict(guidance_scale=2.0, accuracy=0.8, mean_words=16, distinct_2=0.75, degenerate=0.02),
            dict(guidance_scale=3.0, accuracy=0.9, mean_words=5, distinct_2=0.5, degenerate=0.2)]
    assert choose_scale(rows, real)["guidance_scale"] == 2.0  # 3.0 scores higher but collapses the text
    assert choose_scale(rows[2:], real) is None
    assert choose_scale([{**rows[0], "accuracy": None}], real) is None  # no judge, nothing to choose by


def test_save_guidance_records_the_choice_in_the_manifests(trained_store, eval_home, cli, tmp_path):
    from prefixtune.store import AdapterStore

    s = trained_store
    refused = cli(["eval", "--adapter", "emotion", "--store", s["store"], "--save-guidance"])
    assert refused.exit_code == 2 and "--guidance-sweep" in refused.output
    result = cli(["eval", "--adapter", "emotion", "--store", s["store"], "--data", s["data"], "--out",
                  tmp_path / "r", "--guidance-sweep", "1,2", "--guidance-negative", "none", "--save-guidance", *FAST,
                  "--temperature", "0.8", "--top-p", "0.95"])  # at 1 the random tiny model repeats its favourite tokens
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    saved = report["saved_guidance"]
    store = AdapterStore(s["store"])
    for label in LABELS:
        assert store.manifest(f"emotion-{label}").guidance == saved
    assert saved["scale"] in (1.0, 2.0) and saved["negative"] is None and "accuracy" in saved["measured"]
