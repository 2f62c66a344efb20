"""Pure metrics, the judge (cache, pluggable factories), LoRA targets and report formatting."""

from __future__ import annotations

import math
import time

import pytest

from prefixtune.data import load_data
from prefixtune.eval.judge import JudgeError, TfidfJudge, judge_cache_path, judge_from_spec, load_judge
from prefixtune.eval.metrics import CopyIndex, conditioning, copy_rate, distinct_n, reference_scores


def test_distinct_n_counts_unique_ngrams_over_all_outputs():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) repeats
    assert distinct_n(["The  Cat", "the cat"], 2) == 0.5  # case and spacing do not make n-grams distinct
    assert distinct_n([], 1) == 0.0 and distinct_n(["one"], 2) == 0.0


def test_copy_rate_catches_verbatim_and_truncated_copies_only():
    train = ["i feel so happy today", "this is a long memorised training tweet that goes on and on"]
    index = CopyIndex(train)
    assert index.is_copy("  I feel so HAPPY   today ")  # verbatim up to case/whitespace
    assert index.is_copy("this is a long memorised training tweet that goes")  # cut off by max_new_tokens
    assert index.is_copy("oh this is a long memorised training tweet that goes on and on !")  # contains one
    assert not index.is_copy("i feel so happy")  # a short common phrase is not a copy
    assert not index.is_copy("i feel so happy today and tomorrow too")  # short train text inside: not counted
    assert copy_rate(["i feel so happy today", "something new", "", "x"], index) == 0.25


def test_conditioning_accuracy_per_label_and_confusion():
    labels = ["anger", "joy", "fear"]
    requested = ["anger", "anger", "joy", "joy", "fear", "fear"]
    judged = ["anger", "joy", "joy", "joy", "anger", "unknown-label"]
    c = conditioning(requested, judged, labels)
    assert c.accuracy == pytest.approx(3 / 6)
    assert c.per_label == {"anger": 0.5, "joy": 1.0, "fear": 0.0}
    assert c.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # the unknown prediction is a miss, in no column
    with pytest.raises(ValueError, match="not one of"):
        conditioning(["love"], ["love"], labels)


def test_reference_scores():
    same = reference_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert same["rouge_l"] == pytest.approx(100.0)
    diff = reference_scores(["a dog barked loudly"], ["the cat sat on the mat"])
    assert diff["bleu"] < 10 and diff["rouge_l"] == 0.0 and 0 < diff["chrf"] < 50


def test_tfidf_judge_is_cached_by_fingerprint_and_reports_its_accuracy(tmp_path, tiny_data):
    data = load_data(str(tiny_data))
    said: list[str] = []
    judge = load_judge(data, say=said.append, home=tmp_path)
    assert isinstance(judge, TfidfJudge) and not judge.from_cache
    assert judge.accuracy == 1.0 and judge.accuracy_split == "test"  # separable data, measured on test
    assert judge.predict(["i feel so furious again", "so scared"]) == ["anger", "fear"]
    path = judge_cache_path(data, tmp_path)
    assert path.is_file() and path.parent.name == "judges" and data.fingerprint in path.name
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # atomic: no temp files left
    stamp = path.stat().st_mtime_ns
    time.sleep(0.01)
    again = load_judge(data, say=said.append, home=tmp_path)
    assert again.from_cache and path.stat().st_mtime_ns == stamp  # loaded, not retrained
    texts = ["i feel so furious again", "so scared", "what a lovely day", "unknown words here"]
    assert again.predict(texts) == judge.predict(texts) and again.accuracy == judge.accuracy  # no pickle needed
    path.write_bytes(b"not a judge file")  # a corrupt cache is retrained, not fatal
    assert not load_judge(data, say=said.append, home=tmp_path).from_cache
    assert any("ignoring unreadable judge cache" in s for s in said)


def test_judge_from_spec_loads_a_factory_and_rejects_bad_specs(tmp_path, monkeypatch, tiny_data):
    (tmp_path / "my_eval_judges.py").write_text(
        "class Always:\n"
        "    def __init__(self, label): self.label = label\n"
        "    def predict(self, texts): return [self.label] * len(texts)\n"
        "def with_data(data): return Always(data.labels[0])\n"
        "def no_args(): return Always('joy')\n"
        "def broken(): return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data(str(tiny_data))
    assert judge_from_spec("my_eval_judges:with_data", data).predict(["x", "y"]) == ["anger", "anger"]
    assert judge_from_spec("my_eval_judges:no_args", data).predict(["x"]) == ["joy"]
    with pytest.raises(JudgeError, match="module:factory"):
        judge_from_spec("my_eval_judges", data)
    with pytest.raises(JudgeError, match="cannot import"):
        judge_from_spec("no_such_module_xyz:f", data)
    with pytest.raises(JudgeError, match="no callable"):
        judge_from_spec("my_eval_judges:missing", data)
    with pytest.raises(JudgeError, match="predict"):
        judge_from_spec("my_eval_judges:broken", data)


def test_lora_targets_are_the_attention_projections():
    from prefixtune.train.methods import attention_targets
    from prefixtune.testing import make_tiny_model

    llama = attention_targets(make_tiny_model("llama"))
    assert sorted({n.rsplit(".", 1)[1] for n in llama}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(llama) == 2 * 4 and not any("mlp" in n for n in llama)
    gpt2 = attention_targets(make_tiny_model("gpt2"))  # Conv1D layers; mlp.c_proj must not be picked
    assert sorted({n.split(".", 3)[3] for n in gpt2}) == ["attn.c_attn", "attn.c_proj"]


def test_markdown_shows_dashes_for_untrained_columns_and_na_for_missing():
    from prefixtune.eval.report import cell, fmt

    prompt_row = {"method": "prompt", "trained": False, "trainable_params": 0, "eval_loss": 2.5}
    assert cell(prompt_row, "trainable_params", "{:,.0f}") == "—"
    assert cell(prompt_row, "eval_loss", "{:.3f}") == "2.500"
    assert fmt(None, "{:.1f}") == "n/a" and fmt(math.nan, "{:.1f}") == "n/a" and fmt(2048, "kb") == "2.0"
