"""`prefixtune compare` on task data: prefix and LoRA trained on template-filled rows, all scored on references."""

from __future__ import annotations

import json


def test_compare_on_task_data_scores_every_method_on_references(tiny_model_dir, eval_home, cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"mr": f"name[P{i % 3}], area[riverside]", "ref": f"P{i % 3} is by the river ({i % 2})."}
            for i in range(24)]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    result = cli(["compare", "--data", data, "--model", tiny_model_dir, "--methods", "prefix,lora,full,prompt",
                  "--template", "{mr}\n", "--text-field", "ref", "--steps", "2", "--batch-size", "4",
                  "--full-lr", "1e-2",
                  "--num-virtual-tokens", "4", "--max-new-tokens", "4", "--num-beams", "2", "--no-isolate",
                  "--device", "cpu", "--no-progress", "--out", out])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["task"] and results["test_inputs"] == 3
    by = {r["method"]: r for r in results["methods"]}
    assert list(by) == ["prefix", "lora", "full", "prompt"]
    for r in by.values():
        assert r["items"] == 3 and r["references"] == 6 and r["decoding"] == "beam 2" and 0 <= r["bleu"] <= 100
    assert by["prefix"]["trained"] and by["lora"]["trained"] and by["full"]["trained"] and not by["prompt"]["trained"]
    assert by["prefix"]["adapter_bytes"] > 0 and by["lora"]["adapter_bytes"] > 0
    assert by["full"]["trainable_params"] == results["base_params"]
    # The fine-tuned weights decode (not the base model's, which the prompt row shows under the same template).
    assert results["outputs"]["full"] != results["outputs"]["prompt"]
    assert "| lora | beam 2 |" in (out / "results.md").read_text()
