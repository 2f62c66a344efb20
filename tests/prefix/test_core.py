"""The prefix core against PEFT and against itself, on every architecture of the tiny matrix."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

import transformers
from prefixtune.prefix.encoder import PrefixConfig
from prefixtune.prefix.model import PrefixModel
from prefixtune.prefix.shapes import UnsupportedModelError, prefix_shape
from prefixtune.testing import TINY_ARCHS, engine_greedy, make_tiny_model



def _peft_twin(base, encoder, num_virtual_tokens, projection):
    """PEFT's model with the same prefix weights as our encoder."""
    from peft import PrefixTuningConfig, get_peft_model

    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=encoder.config.encoder_hidden_size or encoder.shape.hidden_size,
    )
    peft_model = get_peft_model(base, cfg)
    peft_model.prompt_encoder["default"].load_state_dict(encoder.state_dict())
    return peft_model.eval()


def _ids(model, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, model.config.vocab_size, (batch, length), generator=g)


def _generate_alone(pm, ids, adapter):
    return engine_greedy(pm.base, ids.tolist(), pm.prefixes([adapter]), 6)[0]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("projection", [False, True])
def test_logits_match_peft(arch, projection):
    pm = PrefixModel(make_tiny_model(arch))
    enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=5, prefix_projection=projection))
    ids = _ids(pm.base)
    ours = pm(ids, torch.ones_like(ids), ["a", "a"]).logits
    theirs = _peft_twin(pm.base, enc, 5, projection)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    Version(transformers.__version__) == Version("5.24.0"),
    reason="PEFT's generate() ignores the prefix with transformers 5.24.0 (DEVELOPERS.md)",
)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_generation_matches_peft(arch):
    pm = PrefixModel(make_tiny_model(arch))
    enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=4, prefix_projection=False))
    with torch.no_grad():  # a strong prefix, so a dropped prefix could not go unnoticed
        enc.embedding.weight.mul_(10.0)
    ids = _ids(pm.base, batch=1)
    ours = _generate_alone(pm, ids, "a")
    base_only = _generate_alone(pm, ids, None)
    peft_model = _peft_twin(pm.base, enc, 4, False)
    theirs = peft_model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
        pad_token_id=0, eos_token_id=None, min_new_tokens=6,
    )[0, ids.shape[1]:].tolist()
    assert ours == theirs
    assert ours != base_only, "the prefix must change greedy output (a weak prefix would make this test vacuous)"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padding_is_invisible(arch):
    pm = PrefixModel(make_tiny_model(arch))
    pm.add_adapter("a", PrefixConfig(num_virtual_tokens=3))
    short, long = _ids(pm.base, 1, 4, seed=1), _ids(pm.base, 1, 7, seed=2)
    padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    with torch.no_grad():
        batch = pm(padded, mask, ["a", "a"]).logits
        alone_short = pm(short, torch.ones_like(short), ["a"]).logits
        alone_long = pm(long, torch.ones_like(long), ["a"]).logits
    torch.testing.assert_close(batch[0, 3:], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], alone_long[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mixed_adapters_in_one_batch(arch):
    pm = PrefixModel(make_tiny_model(arch))
    pm.add_adapter("A", PrefixConfig(num_virtual_tokens=4, prefix_projection=False))
    pm.add_adapter("B", PrefixConfig(num_virtual_tokens=2, prefix_projection=True))
    adapters = ["A", "B", None, "A"]
    ids = _ids(pm.base, batch=4, length=5, seed=3)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        mixed = pm(ids, mask, adapters).logits
        for row, name in enumerate(adapters):
            alone = pm(ids[row : row + 1], mask[row : row + 1], [name]).logits
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)
        tokens = engine_greedy(pm.base, ids.tolist(), pm.prefixes(adapters), 6)
    for row, name in enumerate(adapters):
        assert tokens[row] == _generate_alone(pm, ids[row : row + 1], name)
    # rows 0 and 2 share a prompt only with themselves; A and none must differ in logits
    assert not torch.allclose(mixed[0], pm(ids[:1], mask[:1], [None]).logits[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_agrees_with_forward(arch):
    """Drift guard: the prefix changes the output, and decode's first token is the forward's argmax."""
    pm = PrefixModel(make_tiny_model(arch))
    pm.add_adapter("a", PrefixConfig(num_virtual_tokens=6))
    ids = _ids(pm.base, batch=1, length=6, seed=4)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with_prefix = pm(ids, mask, ["a"]).logits[0, -1]
        without = pm(ids, mask, [None]).logits[0, -1]
        plain = pm.base(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(without, plain, atol=1e-5, rtol=1e-5)
    assert (with_prefix - without).abs().max() > 1e-3
    assert _generate_alone(pm, ids, "a")[0] == int(with_prefix.argmax())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_only_the_prefix(checkpointing):
    pm = PrefixModel(make_tiny_model("llama"))
    pm.add_adapter("a", PrefixConfig(num_virtual_tokens=3))
    pm.add_adapter("b", PrefixConfig(num_virtual_tokens=3, prefix_projection=False))
    if checkpointing:
        pm.enable_gradient_checkpointing()
    ids = _ids(pm.base, batch=2, length=6)
    labels = ids.clone()
    labels[:, :2] = -100
    out = pm(ids, torch.ones_like(ids), ["a", "b"], labels=labels)
    out.loss.backward()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoders.") for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in pm.base.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradient_checkpointing_keeps_the_prefix(arch):
    """HF drops caches under checkpointing by default; ours must survive with identical loss and grads."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        pm = PrefixModel(make_tiny_model(arch))
        enc = pm.add_adapter("a", PrefixConfig(num_virtual_tokens=3))
        if checkpointing:
            pm.enable_gradient_checkpointing()
        ids = _ids(pm.base, batch=2, length=6)
        out = pm(ids, torch.ones_like(ids), ["a", "a"], labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), enc.embedding.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_sparse_loss_equals_full_logits_loss():
    pm = PrefixModel(make_tiny_model("llama"))
    pm.add_adapter("a", PrefixConfig(num_virtual_tokens=3))
    ids = _ids(pm.base, batch=2, length=8)
    labels = ids.clone()
    labels[:, :3] = -100
    sparse = pm(ids, torch.ones_like(ids), ["a", None], labels=labels)
    full = pm(ids, torch.ones_like(ids), ["a", None], labels=labels, return_logits=True)
    torch.testing.assert_close(sparse.loss, full.loss)
    assert sparse.num_tokens == full.num_tokens == 2 * 5
    alone = pm(ids[1:], torch.ones_like(ids[1:]), [None], labels=labels[1:])
    torch.testing.assert_close(sparse.row_loss_sum[1] / sparse.row_tokens[1], alone.loss.detach())


def test_encoder_decoder_is_refused_clearly():
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        prefix_shape(T5Config(num_layers=1, d_model=8, num_heads=2))


def test_shapes_come_from_the_config():
    shape = prefix_shape(make_tiny_model("qwen3").config)
    assert shape.head_dim == make_tiny_model("qwen3").config.head_dim
    assert shape.flat_dim == 2 * shape.num_layers * shape.kv_heads * shape.head_dim


def test_text_start_through_a_too_narrow_mlp_is_refused():
    from prefixtune.prefix.encoder import PrefixEncoder

    shape = prefix_shape(make_tiny_model("llama").config)
    enc = PrefixEncoder(shape, PrefixConfig(num_virtual_tokens=12, encoder_hidden_size=4))
    with pytest.raises(ValueError, match="--encoder-hidden-size 11"):
        enc.init_from_kv(torch.randn(2 * shape.num_layers, shape.kv_heads, 12, shape.head_dim))


def test_rows_without_scored_tokens_give_zero_loss_not_nan():
    pm = PrefixModel(make_tiny_model("llama"))
    pm.add_adapter("a", PrefixConfig(num_virtual_tokens=2))
    ids = _ids(pm.base, batch=2, length=3)
    out = pm(ids, torch.ones_like(ids), ["a", "a"], labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and out.num_tokens == 0
    assert all(torch.isfinite(p.grad).all() for p in pm.encoders.parameters() if p.grad is not None)
