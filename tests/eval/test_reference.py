"""Reference scoring: rows with one input form one multi-reference item; corpus metrics use every reference."""

from __future__ import annotations

import pytest

from prefixtune.data import Example
from prefixtune.eval.reference import corpus_scores, group_items, sample_items


def _ex(mr: str, ref: str) -> Example:
    return Example(ref, None, (("mr", mr),))


def test_rows_with_the_same_input_become_one_item_in_order():
    rows = [_ex("a", "A one."), _ex("b", "B one."), _ex("a", "A two."), _ex("a", "A one."), _ex("c", "  ")]
    items = group_items(rows)
    assert [i.inputs for i in items] == [{"mr": "a"}, {"mr": "b"}]  # blank references drop; duplicates once
    assert items[0].references == ["A one.", "A two."] and items[1].references == ["B one."]
    many = group_items([_ex(str(n), f"ref {n}") for n in range(10)])
    picked = sample_items(many, 3, seed=0)
    assert len(picked) == 3 and picked == sorted(picked, key=many.index)  # a seeded sample in data order
    assert sample_items(many, 3, seed=0) == picked and sample_items(many, None, seed=0) == many


def test_multi_reference_scores():
    refs = [["the cat sat on the mat today", "a cat was sitting on the mat"], ["it is a sunny day in the park"]]
    perfect = corpus_scores(["a cat was sitting on the mat", "it is a sunny day in the park"], refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["items"] == 2 and perfect["references"] == 3 and perfect["mean_words"] == 7.5
    wrong = corpus_scores(["dogs bark loudly", "rain"], refs)
    assert wrong["bleu"] < 5 and wrong["rouge_l"] < 20 and wrong["chrf"] < perfect["chrf"]
    # The second reference counts: matching only it still scores full marks for that item.
    assert corpus_scores(["a cat was sitting on the mat"], refs[:1])["bleu"] == pytest.approx(100.0)
