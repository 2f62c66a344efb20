"""Damaged or foreign adapter folders are refused with a message naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from prefixtune.adapter_folder import MANIFEST_FILE, StoreError
from prefixtune.prefix.peft_io import CONFIG_FILE, TRAINABLE_FILE, WEIGHTS_FILE, AdapterFormatError, load_adapter
from prefixtune.prefix.shapes import ShapeMismatchError, prefix_shape
from prefixtune.store import AdapterStore
from prefixtune.testing import write_random_adapter


@pytest.fixture
def folder(tmp_path, tiny_lm):
    return write_random_adapter(tmp_path, "a", tiny_lm)


@pytest.fixture
def shape(tiny_lm):
    return prefix_shape(tiny_lm.model.config)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_are_refused(folder, shape, damage):
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xff" * 100, "empty": b""}[damage])
    with pytest.raises(AdapterFormatError, match="weights file is unreadable"):
        load_adapter(folder, shape)


def test_wrong_shapes_name_the_right_value(folder, shape):
    _edit_config(folder, num_layers=5)
    with pytest.raises(ShapeMismatchError, match="num_layers=5 .* must be 2"):
        load_adapter(folder, shape)
    _edit_config(folder, num_layers=2)
    save_file({"prompt_embeddings": torch.zeros(4, 7)}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ShapeMismatchError, match="prompt_embeddings width=7"):
        load_adapter(folder, shape)
    save_file({"prompt_embeddings": torch.zeros(4, 2, 2)}, str(folder / WEIGHTS_FILE))
    with pytest.raises(AdapterFormatError, match="2-D float tensor"):
        load_adapter(folder, shape)


@pytest.mark.parametrize("key, value", [("num_virtual_tokens", -3), ("num_virtual_tokens", "abc"),
                                        ("num_virtual_tokens", 10**9), ("num_layers", "two"),
                                        ("encoder_hidden_size", 0), ("token_dim", True)])
def test_absurd_config_values_are_refused(folder, shape, key, value):
    _edit_config(folder, **{key: value})
    with pytest.raises(AdapterFormatError, match=f"{key}=.* is not a sensible size"):
        load_adapter(folder, shape)


def test_non_object_config_nan_weights_and_bad_trainable_state(folder, shape, tmp_path, tiny_lm):
    (folder / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="must hold a JSON object"):
        load_adapter(folder)
    other = write_random_adapter(tmp_path / "b", "b", tiny_lm)
    save_file({"prompt_embeddings": torch.full((4, shape.flat_dim), float("nan"))}, str(other / WEIGHTS_FILE))
    with pytest.raises(AdapterFormatError, match="NaN or inf"):
        load_adapter(other, shape)
    third = write_random_adapter(tmp_path / "c", "c", tiny_lm)
    (third / TRAINABLE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterFormatError, match=f"{TRAINABLE_FILE} is unreadable"):
        load_adapter(third, shape)


def test_another_models_manifest_is_refused(tmp_path, tiny_lm):
    from prefixtune.engine.lm import PrefixLM

    folder = write_random_adapter(tmp_path, "foreign", tiny_lm, fingerprint="0123456789abcdef", base="other-model")
    with pytest.raises(StoreError, match=r"other-model' \(fingerprint 0123456789abcdef\)"):
        PrefixLM(tiny_lm, AdapterStore(tmp_path)).generate(["x"], ["foreign"], max_new_tokens=1)
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="not a valid prefixtune manifest"):
        AdapterStore(tmp_path).manifest("foreign")


def test_cli_refuses_a_truncated_adapter_in_one_line(folder, tiny_model_dir):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:40])
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--adapter-path", str(folder),
                                      "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "error:" in result.output and "unreadable" in result.output
    assert "Traceback" not in result.output
