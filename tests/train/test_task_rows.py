"""Task templates in training: fields filled, loss on the target only, inputs shortened before the target."""

from __future__ import annotations

import json

import pytest

from prefixtune.adapter_folder import read_manifest
from prefixtune.data import DataError, Example, load_data
from prefixtune.train.config import TrainConfig
from prefixtune.train.run import train
from prefixtune.train.task_rows import tokenize_task

TEMPLATE = "Record: {mr}\nArea: {area}\nSentence:"


def _ex(mr: str, area: str, text: str) -> Example:
    return Example(text, None, (("mr", mr), ("area", area)))


def test_prompt_is_the_filled_template_and_only_the_target_is_scored(tiny_tokenizer):
    ex = _ex("name[The Eagle], food[French]", "riverside", "The Eagle is a French place by the river.")
    rows, counts = tokenize_task([ex], tiny_tokenizer, TEMPLATE, lambda e: "a", max_length=256)
    row = rows[0]
    prompt = "Record: name[The Eagle], food[French]\nArea: riverside\nSentence:"
    assert row.input_ids == tiny_tokenizer(f"{prompt} {ex.text}").input_ids + [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(row.input_ids[:row.prompt_len]) == prompt
    assert tiny_tokenizer.decode(row.input_ids[row.prompt_len:]).strip() == ex.text + tiny_tokenizer.eos_token
    assert counts.inputs_shortened == counts.targets_cut == 0


def test_long_inputs_are_shortened_first_and_the_target_kept(tiny_tokenizer):
    target = "A short sentence."
    long_row = _ex("name[X], " + "food[French], " * 60, "city", target)
    rows, counts = tokenize_task([long_row, _ex("a", "b", target)], tiny_tokenizer, TEMPLATE, lambda e: "a",
                                 max_length=32)
    assert all(len(r.input_ids) <= 32 for r in rows)
    assert counts.inputs_shortened == 1 and counts.targets_cut == 0
    kept = tiny_tokenizer.decode(rows[0].input_ids[rows[0].prompt_len:])
    assert kept.strip() == target + tiny_tokenizer.eos_token  # the whole target, with EOS
    assert "Area: city\nSentence:" in tiny_tokenizer.decode(rows[0].input_ids[:rows[0].prompt_len])
    assert "shortened the input fields of 1 of 2" in counts.describe(32)


def test_a_target_too_long_is_cut_and_counted_and_beyond_the_context_refused(tiny_tokenizer):
    target = "word " * 40
    rows, counts = tokenize_task([_ex("a", "b", target)], tiny_tokenizer, TEMPLATE, lambda e: "a", max_length=16)
    assert len(rows[0].input_ids) == 16 and counts.targets_cut == 1
    assert "targets were cut" in counts.describe(16)
    with pytest.raises(DataError, match=r"target alone is 4\d tokens .* holds 30"):
        tokenize_task([_ex("a", "b", target)], tiny_tokenizer, TEMPLATE, lambda e: "a", max_length=512, context=30)


def test_a_template_naming_a_missing_field_fails_with_the_row(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"mr": "x", "text": "y"}) + "\n"
                                          + json.dumps({"mr": "x", "txt": "z", "text": "y"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 1: the template names field 'area' but this row has "
                                        r"no such field \(fields present: 'mr', 'text'\)"):
        load_data(str(tmp_path), input_fields=["mr", "area"])
    bundle = load_data(str(tmp_path), input_fields=["mr"])
    assert bundle.labels is None and bundle.split("train")[0].values == {"mr": "x"}


def test_task_adapter_manifest_records_fields_not_inputs(tmp_path, tiny_model_dir, tiny_lm):
    rows = [{"mr": f"name[Place {i}], area[riverside]", "ref": f"Place {i} is by the river."} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "run"),
                      name="e2e", text_field="ref", template="{mr}\n", max_steps=2, batch_size=4, eval_every=0,
                      num_virtual_tokens=4, progress=False, device="cpu", dtype="float32")
    folder = train(cfg, loaded=tiny_lm, say=lambda *_: None).adapters["e2e"]
    manifest = read_manifest(folder)
    assert manifest.template == "{mr}\n" and manifest.fields == ["mr"] and manifest.labels is None
    assert "Place 7" not in (folder / "prefixtune.json").read_text()  # no input value lands in the manifest
