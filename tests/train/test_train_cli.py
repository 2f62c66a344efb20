"""The real `prefixtune train` command on a tiny model: config file + flags, early stopping, clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from prefixtune.adapter_folder import read_manifest
from prefixtune.cli import app

runner = CliRunner()


def test_config_file_and_flags(tmp_path, tiny_model_dir, emotion_dir):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata: {emotion_dir}\nmax-examples: 32\neval_examples: 8\nmax_steps: 5\n"
        "num_virtual_tokens: 3\nlr: 0.01\nname: emo\ndevice: cpu\n"
    )
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(cfg), "--max-steps", "2", "--out", str(out),
                                 "--store", str(tmp_path / "store"), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "store" / "emo")
    assert manifest.hyperparams["max_steps"] == 2, "a flag overrides the file"
    assert manifest.hyperparams["num_virtual_tokens"] == 3 and manifest.hyperparams["max_examples"] == 32
    assert "adapter emo:" in result.output


def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text('learning_rate = 0.1\n')
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "error:" in result.output and "unknown settings learning_rate" in result.output


def test_early_stopping(tmp_path, tiny_model_dir, emotion_dir):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_model_dir), "--data", str(emotion_dir), "--out", str(out),
        "--max-examples", "64", "--eval-examples", "8", "--max-steps", "8", "--eval-every", "1", "--lr", "0",
        "--early-stopping", "2", "--num-virtual-tokens", "2", "--no-progress", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "early stopping at step 3" in result.output  # lr 0: evals 2 and 3 bring no gain over eval 1
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 3


def test_bad_data_is_one_line_error(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine", "label": "joy"}\n{"text": "   ", "label": "joy"}\n')
    result = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "error:" in result.output and "line 2" in result.output


def test_per_label_uses_the_family_recipe_for_what_is_not_given(tmp_path, tiny_model_dir, emotion_dir):
    from prefixtune.train.config import BASE_GUIDANCE_SCALE, FAMILY_RECIPE

    store = tmp_path / "store"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_model_dir), "--data", str(emotion_dir), "--out", str(tmp_path / "run"),
        "--per-label", "--labels", "joy,anger", "--max-examples", "40", "--eval-examples", "8", "--max-steps", "2",
        "--num-virtual-tokens", "2", "--lr", "0.005", "--store", str(store), "--no-progress", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    joy = read_manifest(store / "emotion-joy")
    assert joy.hyperparams["lr"] == 0.005, "a given flag wins over the recipe"
    for key in ("init", "init_text", "prefix_projection", "family_rate", "balance"):
        assert joy.hyperparams[key] == FAMILY_RECIPE[key], key
    assert joy.guidance == {"scale": FAMILY_RECIPE["guidance_scale"], "negative": "emotion-all"}
    assert read_manifest(store / "emotion-all").label is None

    # A template with {label} has no single prompt for a family adapter: the recipe leaves it out.
    result = runner.invoke(app, [
        "train", "--model", str(tiny_model_dir), "--data", str(emotion_dir), "--out", str(tmp_path / "run2"),
        "--per-label", "--labels", "joy,anger", "--template", "Emotion: {label}\nText:", "--max-examples", "40",
        "--eval-examples", "8", "--max-steps", "1", "--num-virtual-tokens", "2", "--store", str(tmp_path / "s2"),
        "--name", "tpl", "--no-progress", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "s2" / "tpl-all").exists()
    assert read_manifest(tmp_path / "s2" / "tpl-joy").guidance == {"scale": BASE_GUIDANCE_SCALE, "negative": None}
