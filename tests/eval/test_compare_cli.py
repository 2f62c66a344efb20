"""`prefixtune compare` end to end on a tiny model: every column numeric, plots written, config re-runnable."""

from __future__ import annotations

import json
import math

from evalhelpers import LABELS, write_data

from prefixtune.eval.compare import CompareConfig
from prefixtune.eval.report import COMPARE_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--samples-per-label", "2", "--max-new-tokens", "6", "--eval-examples", "12", "--latency-tokens", "4",
        "--latency-repeats", "1", "--num-virtual-tokens", "4", "--lr", "1e-2", "--device", "cpu", "--no-progress"]


def _history(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compare_end_to_end_and_rerun_from_config(tiny_model_dir, eval_home, cli, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "cmp"
    result = cli(["compare", "--data", data, "--model", tiny_model_dir, "--methods", "prefix,lora,prompt",
                  "--steps", "2", "--batch-size", "6", "--out", out, "--guidance-scale", "2", *FAST])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["prefix", "lora", "prompt"]
    for row in rows.values():
        for key, _, _ in COMPARE_COLUMNS:
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (row["method"], key, value)
        assert 0.0 <= row["conditioning_accuracy"] <= 1.0 and row["eval_loss"] > 0
        assert sorted(row["conditioning"]["per_label"]) == LABELS
        assert row["latency_ms_per_token"] > 0 and row["base_latency_ms_per_token"] > 0
    prefix, lora, prompt = rows["prefix"], rows["lora"], rows["prompt"]
    # Both trained methods' samples are guided the same way, against the base model; prompting has no adapter.
    assert prefix["guidance"] == lora["guidance"] == {"scale": 2.0, "negative": None} and "guidance" not in prompt
    for trained in (prefix, lora):
        assert trained["trained"] and trained["steps"] == 2
        assert trained["train_seconds"] > 0 and trained["train_tokens_per_s"] > 0
        assert trained["peak_train_memory_mb"] > 0 and trained["adapter_bytes"] > 0
        assert 0 < trained["trainable_pct"] < 100
    # r=8 on q,k,v,o of 2 layers (hidden 64, 2 KV heads x 16): 2 * (1024 + 768 + 768 + 1024) parameters.
    assert lora["trainable_params"] == 7168 and lora["prefix_length"] == 0
    assert prefix["trainable_params"] > 0 and prefix["prefix_length"] == 4
    assert not prompt["trained"] and prompt["trainable_params"] == 0 and prompt["adapter_bytes"] == 0
    assert prompt["prefix_length"] > 10  # the chat-templated instruction's tokens
    assert results["judge"]["accuracy"] == 1.0

    # The same batches and the same optimizer schedule for both trained methods.
    ph, lh = _history(out / "prefix" / "train_log.jsonl"), _history(out / "lora" / "train_log.jsonl")
    lrs = lambda h: [r["lr"] for r in h if r["kind"] == "train"]  # noqa: E731
    assert len(lrs(ph)) == 2 and lrs(ph) == lrs(lh)

    for png in ("bars_quality.png", "bars_cost.png", "loss_curves.png"):
        assert (out / png).read_bytes().startswith(PNG), png
    md = (out / "results.md").read_text()
    assert "| method | trainable params |" in md and all(f"| {m} |" in md for m in rows)
    section = (out / "readme_section.md").read_text()
    assert section.startswith("## Prefix tuning or LoRA?") and "--steps 2" in section
    assert "n/a" not in section.split("\n\n")[2]  # the section's table: every number present

    # The stored config repeats the run; flags given with --config override it.
    saved = json.loads((out / "config.json").read_text())
    assert CompareConfig(**saved).steps == 2 and saved["methods"] == ["prefix", "lora", "prompt"]
    again = tmp_path / "again"
    # In-process this time (--no-isolate), and without samples or timing to keep the test short.
    result = cli(["compare", "--config", out / "config.json", "--out", again, "--methods", "prefix",
                  "--no-isolate", "--samples-per-label", "0", "--latency-repeats", "0"])
    assert result.exit_code == 0, result.output
    rerun = json.loads((again / "results.json").read_text())
    assert [r["method"] for r in rerun["methods"]] == ["prefix"] and rerun["config"]["steps"] == 2
    assert rerun["config"]["lr"] == 1e-2 and rerun["config"]["num_virtual_tokens"] == 4  # from the file
    assert rerun["methods"][0]["eval_loss"] == prefix["eval_loss"]  # deterministic: same data, steps, seed


def test_compare_rejects_bad_settings_before_training(tiny_model_dir, eval_home, cli, tmp_path):
    out = tmp_path / "bad"
    result = cli(["compare", "--data", tmp_path, "--model", tiny_model_dir, "--methods", "prefix,adapterfusion",
                  "--out", out])
    assert result.exit_code == 2 and "unknown adapterfusion" in result.output
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": 3, "stepz": 4}))
    result = cli(["compare", "--config", tmp_path / "cfg.json"])
    assert result.exit_code == 2 and "unknown settings stepz" in result.output
    result = cli(["compare", "--data", tmp_path, "--instruction", "no placeholder", "--out", out])
    assert result.exit_code == 2 and "{label}" in result.output


def test_per_label_prefix_trains_with_the_train_recipe():
    from prefixtune.eval.compare import CompareConfig, with_prefix_recipe
    from prefixtune.train.config import FAMILY_RECIPE

    cfg = CompareConfig(**with_prefix_recipe({"per_label": True, "init": "random"}))
    prefix = cfg.train_config("prefix")
    assert prefix.init == "random", "a given setting wins over the recipe"
    assert (prefix.init_text, prefix.prefix_projection, prefix.balance, prefix.lr) == (
        FAMILY_RECIPE["init_text"], FAMILY_RECIPE["prefix_projection"], FAMILY_RECIPE["balance"], FAMILY_RECIPE["lr"])
    assert prefix.label_word_weight == FAMILY_RECIPE["label_word_weight"]
    lora = cfg.train_config("lora")
    assert lora.lr == cfg.lr and lora.label_word_weight == 1.0  # LoRA keeps its own (label in the prompt)
    lora.validate()
    assert with_prefix_recipe({"per_label": False}) == {"per_label": False}
