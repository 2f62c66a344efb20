"""--label-word-weight: each label's adapter counts its label's distinctive words more in the loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from prefixtune.data import DataBundle, Example
from prefixtune.prefix.model import PrefixModel
from prefixtune.train.config import ConfigError, TrainConfig
from prefixtune.train.label_words import distinctive_words
from prefixtune.train.run import train
from prefixtune.train.plan import plan_run
from prefixtune.train.word_weights import WordWeights, word_token_ids

ROWS = [("i feel angry and mad", "anger"), ("so angry today", "anger"), ("mad at you all", "anger"),
        ("i feel happy and glad", "joy"), ("glad happy day", "joy"), ("a happy glad morning", "joy")]


def _data(validation: bool = True) -> DataBundle:
    rows = [Example(t, lab) for t, lab in ROWS * 6]
    splits = {"train": rows, "validation": [Example(t, lab) for t, lab in ROWS]} if validation else {"train": rows}
    return DataBundle("mem", splits, ["anger", "joy"], "mem")


def _cfg(tmp_path, model_dir, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data="mem", out=str(tmp_path / "run"), store=str(tmp_path / "store"),
                per_label=True, family_rate=0.25, num_virtual_tokens=4, prefix_projection=False, max_steps=2,
                eval_examples=6, eval_every=0, label_word_weight=10.0, label_word_count=2, device="cpu",
                dtype="float32", progress=False)
    return TrainConfig(**{**base, **kw})


def test_weights_follow_each_rows_adapter_and_target_token():
    weights = WordWeights({"e-anger": [5, 7], "e-joy": [9]}, 10.0, vocab_size=12)
    labels = torch.tensor([[-100, 5, 9, 7], [-100, 9, 5, 3], [-100, 5, 9, 7], [-100, 3, 9, 9]])
    got = weights(["e-anger", "e-joy", "e-all", "e-joy"], labels)  # e-all: the family adapter, never weighted
    # Only a row's first label word counts more: every occurrence taught repetition loops.
    assert got.tolist() == [[1, 10, 1, 1], [1, 10, 1, 1], [1, 1, 1, 1], [1, 1, 10, 1]]


def test_word_token_ids_are_each_words_first_token(tiny_tokenizer):
    ids = word_token_ids(tiny_tokenizer, ["angry"])
    assert tiny_tokenizer.encode(" angry", add_special_tokens=False)[0] in ids
    assert tiny_tokenizer.encode("angry", add_special_tokens=False)[0] in ids
    assert len(ids) <= 2


def test_weighted_loss_is_the_weighted_mean_and_row_sums_stay_plain(tiny_lm):
    model = PrefixModel(tiny_lm.model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    w = torch.ones(2, 7)
    w[0, 4], w[1, 6] = 10.0, 3.0
    plain = model(ids, torch.ones_like(ids), labels=labels, prefixes=[None, None])
    weighted = model(ids, torch.ones_like(ids), labels=labels, prefixes=[None, None], token_weights=w)
    logits = model(ids, torch.ones_like(ids), prefixes=[None, None]).logits[:, :-1]  # (B, T-1, V)
    keep = labels[:, 1:] != -100
    nll = F.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="none")
    torch.testing.assert_close(weighted.loss, (nll * w[:, 1:][keep]).mean())
    torch.testing.assert_close(plain.loss, nll.mean())
    torch.testing.assert_close(weighted.row_loss_sum, plain.row_loss_sum)


def test_a_weighted_family_run_weights_only_label_adapters_and_records_it(tmp_path, tiny_model_dir, tiny_lm):
    data = _data()
    plan = plan_run(_cfg(tmp_path, tiny_model_dir), loaded=tiny_lm, data=data, say=lambda *_: None)
    words = distinctive_words([ex.text for ex in data.splits["train"]], [ex.label for ex in data.splits["train"]])
    assert set(plan.word_tokens) == {"emotion-anger", "emotion-joy"}  # not emotion-all, the guidance negative
    assert plan.word_tokens["emotion-anger"] == word_token_ids(tiny_lm.tokenizer, words["anger"][:2])
    result = train(_cfg(tmp_path, tiny_model_dir), loaded=tiny_lm, data=data, say=lambda *_: None)
    manifest = json.loads((tmp_path / "store" / "emotion-anger" / "prefixtune.json").read_text())
    assert manifest["hyperparams"]["label_word_weight"] == 10.0 and result.summary["steps"] == 2
    # The logged training loss is the plain one: weight 1 and weight 10 start from the same first-step loss.
    logs = []
    for weight in (1.0, 10.0):
        out = tmp_path / f"w{weight}"
        train(_cfg(tmp_path, tiny_model_dir, out=str(out), store=str(out / "store"), label_word_weight=weight,
                   max_steps=1), loaded=tiny_lm, data=data, say=lambda *_: None)
        logs.append(json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"])
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)


def test_label_word_weight_needs_a_per_label_family(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="--label-word-weight"):
        _cfg(tmp_path, tiny_model_dir, per_label=False, family_rate=0.0).validate()
    with pytest.raises(ConfigError, match="label_word_weight"):
        _cfg(tmp_path, tiny_model_dir, label_word_weight=0.0).validate()
