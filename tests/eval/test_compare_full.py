"""`prefixtune compare --methods prefix,lora,full,prompt` on a tiny model: full fine-tuning trains every weight in
the same loop, its checkpoint is the whole model, and it costs the most memory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from evalhelpers import LABELS, write_data

from prefixtune.eval.report import COMPARE_COLUMNS

FAST = ["--samples-per-label", "2", "--max-new-tokens", "6", "--eval-examples", "12", "--latency-tokens", "4",
        "--latency-repeats", "1", "--num-virtual-tokens", "4", "--lr", "1e-2", "--device", "cpu", "--no-progress"]


def test_compare_full_fine_tuning_beside_prefix_lora_and_prompting(tiny_model_dir, eval_home, cli, tmp_path):
    from transformers import AutoConfig

    data = write_data(tmp_path / "data")
    out = tmp_path / "cmp"
    result = cli(["compare", "--data", data, "--model", tiny_model_dir, "--methods", "prefix,lora,full,prompt",
                  "--steps", "3", "--batch-size", "2", "--max-length", "12", "--out", out, *FAST])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["prefix", "lora", "full", "prompt"]
    for row in rows.values():
        for key, _, _ in COMPARE_COLUMNS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["method"], key, row[key])
        assert sorted(row["conditioning"]["per_label"]) == LABELS and row["eval_loss"] > 0
    prefix, lora, full = rows["prefix"], rows["lora"], rows["full"]

    # Every weight trains: the base model's parameter count (tied embeddings counted once), 100%.
    assert full["trainable_params"] == results["base_params"] and full["trainable_pct"] == 100.0
    assert full["steps"] == 3 and "guidance" not in full
    # The checkpoint is the whole model in float32 (plus a small header); the prefix is its folded keys/values.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    prefix_floats = 4 * 2 * config.num_hidden_layers * kv
    assert 4 * results["base_params"] <= full["adapter_bytes"] < 4 * results["base_params"] + 64_000
    assert 4 * prefix_floats <= prefix["adapter_bytes"] < 4 * prefix_floats + 4096
    assert full["adapter_bytes"] / prefix["adapter_bytes"] > results["base_params"] / prefix_floats / 3
    # AdamW keeps two moments of every weight (the checkpoint holds them), on top of the gradients. On this tiny
    # model each training process's fixed costs (~140 MB) swamp that in the resident-set figures, so their
    # ordering is shown on SmolLM2 (docs/BENCHMARKS.md: 2,681 MB added vs 1,386 for the prefix); here they
    # must at least hold the three copies.
    state = torch.load(out / "full" / "checkpoint" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert sum(v["exp_avg"].numel() + v["exp_avg_sq"].numel() for v in state.values()) == 2 * results["base_params"]
    assert full["train_memory_added_mb"] >= 3 * 4 * results["base_params"] / 2**20
    assert full["peak_train_memory_mb"] > full["train_memory_added_mb"] > 0

    # Same batches and schedule shape as the adapters; the learning rate is full fine-tuning's own.
    logs = {m: [json.loads(x) for x in (out / m / "train_log.jsonl").read_text().splitlines()]
            for m in ("lora", "full")}
    lrs = {m: [r["lr"] for r in log if r["kind"] == "train"] for m, log in logs.items()}
    assert [x / 1e-2 for x in lrs["lora"]] == pytest.approx([x / 5e-5 for x in lrs["full"]])
    assert results["config"]["full_lr"] == 5e-5
    # The saved folder is a whole model: it loads as a base model, and its weights differ from the start's.
    folder = out / "full" / "last" / "full"
    from prefixtune.models import load_base_model

    tuned, base = load_base_model(str(folder), "cpu"), load_base_model(tiny_model_dir, "cpu")
    moved = [not torch.equal(a, b) for a, b in zip(tuned.model.parameters(), base.model.parameters())]
    assert len(moved) == len(list(base.model.parameters())) and all(moved)
    md = (out / "results.md").read_text()
    assert "| full |" in md and "memory added by training (MB)" in md
    assert "**Against full fine-tuning.**" in (out / "readme_section.md").read_text()

