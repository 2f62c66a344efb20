"""PEFT's file format both ways: ours loads in PEFT, PEFT's loads in ours, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefixtune.prefix.encoder import PrefixConfig
from prefixtune.prefix.model import PrefixModel, kv_from_flat
from prefixtune.prefix.peft_io import (
    CONFIG_FILE,
    TRAINABLE_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    load_adapter,
    save_adapter,
)
from prefixtune.prefix.shapes import ShapeMismatchError, prefix_shape
from prefixtune.testing import make_tiny_model


def _ids(vocab):
    return torch.randint(5, vocab, (2, 6), generator=torch.Generator().manual_seed(0))


def _our_logits(pm, flat, ids):
    with torch.no_grad():
        kv = kv_from_flat(flat, pm)
        return pm(ids, torch.ones_like(ids), prefixes=[kv, kv]).logits


@pytest.mark.parametrize("projection", [True, False])
def test_ours_loads_in_peft(tmp_path, projection):
    from peft import PeftModel

    pm = PrefixModel(make_tiny_model("llama"))
    enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=4, prefix_projection=projection))
    save_adapter(tmp_path, enc.fold(), pm.shape, enc.config, "tiny-llama", encoder=enc)
    # The MLP is kept beside PEFT's files; without one, PEFT's file already is the whole state.
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE} | ({TRAINABLE_FILE} if projection else set())
    assert load_file(str(tmp_path / WEIGHTS_FILE))["prompt_embeddings"].shape == (4, pm.shape.flat_dim)
    ids = _ids(pm.base.config.vocab_size)
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(_our_logits(pm, enc.fold(), ids), theirs, atol=1e-5, rtol=1e-5)


def test_peft_saved_loads_in_ours(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    base = make_tiny_model("mistral")
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    peft_model.save_pretrained(tmp_path)
    pm = PrefixModel(make_tiny_model("mistral"))
    loaded = load_adapter(tmp_path, pm.shape)
    assert loaded.num_virtual_tokens == 5 and loaded.config.prefix_projection is False
    torch.testing.assert_close(_our_logits(pm, loaded.flat, ids), theirs, atol=1e-5, rtol=1e-5)


def test_half_storage_halves_the_file(tmp_path):
    pm = PrefixModel(make_tiny_model("llama"))
    enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=8, prefix_projection=False))
    save_adapter(tmp_path / "f32", enc.fold(), pm.shape, enc.config, "m")
    save_adapter(tmp_path / "bf16", enc.fold(), pm.shape, enc.config, "m", storage_dtype="bfloat16")
    big = (tmp_path / "f32" / WEIGHTS_FILE).stat().st_size
    small = (tmp_path / "bf16" / WEIGHTS_FILE).stat().st_size
    assert small < 0.55 * big
    loaded = load_adapter(tmp_path / "bf16", pm.shape)
    torch.testing.assert_close(loaded.flat, enc.fold(), atol=2e-2, rtol=2e-2)


def test_wrong_model_shape_names_the_right_value(tmp_path):
    pm = PrefixModel(make_tiny_model("llama"))
    enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=2))
    save_adapter(tmp_path, enc.fold(), pm.shape, enc.config, "m")
    other = prefix_shape(make_tiny_model("gpt2").config)
    with pytest.raises(ShapeMismatchError, match=f"must be {other.token_dim}"):
        load_adapter(tmp_path, other)


def test_not_a_prefix_adapter(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterFormatError, match="LORA"):
        load_adapter(tmp_path)
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        load_adapter(tmp_path / "missing")


def test_saved_files_are_readable_by_others(tmp_path):
    import os

    pm = PrefixModel(make_tiny_model("llama"))
    enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=2))
    save_adapter(tmp_path, enc.fold(), pm.shape, enc.config, "m")
    mask = os.umask(0)
    os.umask(mask)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_written_config_is_exactly_pefts_own():
    import json

    from peft import PrefixTuningConfig

    from prefixtune.prefix.encoder import PrefixConfig
    from prefixtune.prefix.peft_io import peft_config_dict
    from prefixtune.prefix.shapes import PrefixShape

    shape = PrefixShape(num_layers=3, kv_heads=2, head_dim=16, hidden_size=64, model_type="llama")
    for config in (PrefixConfig(5), PrefixConfig(7, prefix_projection=False, encoder_hidden_size=48)):
        theirs = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens, token_dim=shape.token_dim,
            num_layers=shape.num_layers, num_attention_heads=shape.kv_heads,
            encoder_hidden_size=config.encoder_hidden_size or shape.hidden_size,
            prefix_projection=config.prefix_projection, base_model_name_or_path="m", inference_mode=True).to_dict()
        ours = peft_config_dict(shape, config, "m")
        assert json.loads(json.dumps(ours)) == json.loads(json.dumps(theirs, default=str))
