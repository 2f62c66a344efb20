"""`{label_words}` in an init text: each label's distinctive training words start its prefix."""

from __future__ import annotations

import torch

from prefixtune.data import DataBundle, Example
from prefixtune.prefix.encoder import text_kv
from prefixtune.train.config import TrainConfig
from prefixtune.train.label_words import distinctive_words, fill_label_words, mixed_words
from prefixtune.train.plan import plan_run


def test_distinctive_words_rank_each_labels_own_vocabulary():
    texts = ["i feel angry and mad", "so angry today", "mad at you", "i feel happy and glad", "glad today",
             "happy happy day", "i feel today"] * 3
    labels = ["anger", "anger", "anger", "joy", "joy", "joy", "joy"] * 3
    words = distinctive_words(texts, labels, k=2)
    assert set(words["anger"]) == {"angry", "mad"}
    assert set(words["joy"]) == {"happy", "glad"}
    assert mixed_words(words, k=3) == [words["anger"][0], words["joy"][0], words["anger"][1]]
    assert fill_label_words("i feel {label_words}", ["a", "b"]) == "i feel a b"


def test_each_adapter_starts_from_its_labels_words(tmp_path, tiny_model_dir, tiny_lm):
    rows = [Example(t, l) for t, l in [("i feel angry and mad", "anger"), ("so angry today", "anger"),
                                        ("i feel happy and glad", "joy"), ("glad happy day", "joy")] * 6]
    data = DataBundle("mem", {"train": rows, "validation": rows[:4]}, ["anger", "joy"], "mem")
    cfg = TrainConfig(model=str(tiny_model_dir), data="mem", out=str(tmp_path / "run"), per_label=True,
                      family_rate=0.25, init="text", init_text="i feel {label_words}", num_virtual_tokens=6,
                      prefix_projection=False, max_steps=1, eval_examples=4, device="cpu", dtype="float32")
    plan = plan_run(cfg, loaded=tiny_lm, data=data, say=lambda *_: None)
    words = distinctive_words([ex.text for ex in rows], [ex.label for ex in rows])
    for name, text in [("emotion-anger", "i feel " + " ".join(words["anger"])),
                       ("emotion-all", "i feel " + " ".join(mixed_words(words)))]:
        want = text_kv(tiny_lm.model, tiny_lm.tokenizer, text, plan.model.shape, 6)
        assert torch.allclose(plan.model.encoders[name].kv().detach(), want, atol=1e-5), name
