"""Per-label families: the unconditional family adapter (NAME-all) and the contrastive (discriminative) loss."""

from __future__ import annotations

import random

import pytest
import torch

from prefixtune.adapter_folder import read_manifest
from prefixtune.prefix.encoder import PrefixConfig
from prefixtune.prefix.model import PrefixModel
from prefixtune.train.config import ConfigError, TrainConfig
from prefixtune.train.contrastive import contrastive_forward
from prefixtune.train.examples import Tokenized, collate
from prefixtune.train.run import train
from prefixtune.testing import make_tiny_model


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_examples=48,
                eval_examples=16, max_steps=3, eval_every=0, batch_size=8, num_virtual_tokens=4, lr=1e-2,
                progress=False, device="cpu", dtype="float32", per_label=True, labels=["joy", "anger", "fear"],
                balance=True, store=str(tmp_path / "store"))
    base.update(kw)
    return TrainConfig(**base)


def _rows(tokenizer, adapters):
    texts = ["i feel so happy today", "this makes me furious", "i am scared of the dark", "what a day"]
    rows = []
    for i, adapter in enumerate(adapters):
        ids = tokenizer(f"Text: {texts[i % len(texts)]}").input_ids + [tokenizer.eos_token_id]
        rows.append(Tokenized(ids, 2, adapter))
    return collate(rows, tokenizer.pad_token_id)


def test_contrastive_loss_trains_only_the_prefixes(tiny_tokenizer):
    model = PrefixModel(make_tiny_model("llama"))
    family = ["f-joy", "f-anger", "f-fear"]
    for name in family + ["f-all"]:
        model.add_adapter(name, PrefixConfig(4, prefix_projection=False))
    batch = _rows(tiny_tokenizer, ["f-joy", "f-anger", "f-all", "f-fear"])
    parts = contrastive_forward(model, batch, family, 0, random.Random(0), torch.device("cpu"))
    assert parts.contrasted == 3  # the family adapter's row has no negatives
    (parts.lm_sum + parts.contrast_sum).backward()
    assert all(p.grad is None for p in model.base.parameters())
    for name in family + ["f-all"]:
        grad = model.encoders[name].embedding.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The LM part equals the plain per-row loss of the rows under their own adapters.
    plain = model(batch.input_ids, batch.attention_mask, adapters=batch.adapters, labels=batch.labels)
    assert parts.lm_tokens == plain.num_tokens
    assert torch.allclose(parts.lm_sum.detach(), plain.loss.detach() * plain.num_tokens, rtol=1e-5)


def test_contrastive_loss_is_the_family_classifiers_cross_entropy(tiny_tokenizer):
    model = PrefixModel(make_tiny_model("llama"))
    family = ["f-joy", "f-anger"]
    for name in family:
        model.add_adapter(name, PrefixConfig(4, prefix_projection=False))
    batch = _rows(tiny_tokenizer, ["f-joy"])
    parts = contrastive_forward(model, batch, family, 1, random.Random(0), torch.device("cpu"))
    nll = {a: model(batch.input_ids, batch.attention_mask, adapters=[a], labels=batch.labels).row_nll[0]
           for a in family}
    expected = -torch.log_softmax(torch.stack([-nll["f-joy"], -nll["f-anger"]]), 0)[0]
    assert torch.allclose(parts.contrast_sum, expected, rtol=1e-5)


def test_family_adapter_and_recommended_guidance(tmp_path, tiny_model_dir, tiny_lm, emotion_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, family_rate=0.25, contrastive_weight=0.5,
               contrastive_negatives=1, guidance_scale=2.0)
    result = train(cfg, loaded=tiny_lm)
    assert sorted(result.adapters) == ["emotion-all", "emotion-anger", "emotion-fear", "emotion-joy"]
    family = read_manifest(tmp_path / "store" / "emotion-all")
    assert family.label is None and family.guidance == {}
    assert sorted(family.labels) == ["anger", "fear", "joy"]
    joy = read_manifest(tmp_path / "store" / "emotion-joy")
    assert joy.guidance == {"scale": 2.0, "negative": "emotion-all"}  # against the family's own adapter
    assert None not in joy.labels
    log = (result.out / "train_log.jsonl").read_text()
    assert "contrastive_loss" in log


@pytest.mark.parametrize("kw", [dict(family_rate=1.0), dict(contrastive_weight=-1.0), dict(per_label=False,
                                                                                               family_rate=0.2)])
def test_family_settings_are_validated(tmp_path, kw):
    with pytest.raises(ConfigError):
        TrainConfig(**{"per_label": True, **kw}).validate()
