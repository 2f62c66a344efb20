"""A task adapter end to end on a tiny model: record (two fields) -> a fixed sentence, learnt to near-perfect
BLEU on held-out rows, through template filling, target-only loss, multi-reference grouping and beam search.

The tiny random model attends almost uniformly (weights of 0.02), so no prefix could make it tell two
records apart; its query/key weights are scaled up so attention depends on content, as a trained model's does.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.models import load_base_model
from prefixtune.testing import make_tiny_model, make_tiny_tokenizer
from prefixtune.train.config import TrainConfig
from prefixtune.train.run import train

TEMPLATE = "Color: {color}; size: {size}\n"
COLORS, SIZES = ("red", "blue"), ("big", "small")


def sentence(color: str, size: str) -> str:
    return f"the {size} one is {color}"


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    model = make_tiny_model("llama", seed=0, sharp=True)
    model.save_pretrained(root / "model")
    make_tiny_tokenizer().save_pretrained(root / "model")
    combos = [(c, s) for c in COLORS for s in SIZES]
    data = root / "data"
    data.mkdir()
    _jsonl(data / "train.jsonl", [{"color": c, "size": s, "target": sentence(c, s)} for c, s in combos] * 8)
    _jsonl(data / "validation.jsonl", [{"color": c, "size": s, "target": sentence(c, s)} for c, s in combos])
    # Held-out rows: each record twice, with the canonical sentence and a second reference.
    _jsonl(data / "test.jsonl", [{"color": c, "size": s, "target": t} for c, s in combos
                                 for t in (sentence(c, s), f"it is {s} and {c}")])
    loaded = load_base_model(str(root / "model"), device="cpu", dtype="float32")
    cfg = TrainConfig(model=str(root / "model"), data=str(data), out=str(root / "run"), store=str(root / "store"),
                      name="colors", text_field="target", template=TEMPLATE, max_steps=200, batch_size=4, lr=0.1,
                      num_virtual_tokens=8, prefix_projection=False, warmup_ratio=0.0, schedule="constant",
                      eval_every=0, save_every=0, progress=False, device="cpu", dtype="float32")
    train(cfg, loaded=loaded, say=lambda *_: None)
    return {"root": root, "model": root / "model", "store": root / "store", "data": data}


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_eval_groups_references_and_scores_near_perfect_bleu_with_beams(task):
    out = task["root"] / "eval"
    result = _cli("eval", "--adapter", "colors", "--store", task["store"], "--data", task["data"],
                  "--reference-field", "target", "--num-beams", "3", "--max-new-tokens", "8", "--out", out,
                  "--device", "cpu", "--no-progress")
    assert "colors: BLEU" in result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["task"] and report["fields"] == ["color", "size"] and report["distinct_inputs"] == 4
    ours, base = report["result"]["colors"], report["result"]["base (same template, no prefix)"]
    assert ours["items"] == 4 and ours["references"] == 8 and ours["decoding"] == "beam 3"
    assert ours["bleu"] > 95 and ours["rouge_l"] > 95
    assert base["bleu"] < 20  # the untrained reference line under the same template
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["colors"] for s in samples} == {sentence(c, s) for c in COLORS for s in SIZES}
    assert "| colors | beam 3 |" in (out / "eval.md").read_text()


def test_generate_fills_inputs_greedy_and_beam(task):
    rows = [{"color": "red", "size": "big"}, {"color": "blue", "size": "small"}]
    file = task["root"] / "rows.jsonl"
    _jsonl(file, [{**rows[1], "target": "ignored"}])
    for beams in ("1", "3"):
        out = json.loads(_cli("generate", "--model", task["model"], "--store", task["store"], "--adapter",
                              "colors", "--input", json.dumps(rows[0]), "--input-file", file, "--num-beams",
                              beams, "-n", "8", "--device", "cpu", "--json").stdout)
        assert [o["text"].strip() for o in out] == ["the big one is red", "the small one is blue"]
        assert [o["input"] for o in out] == [rows[0], {**rows[1], "target": "ignored"}]
        assert out[0]["prompt"] == "Color: red; size: big\n" and out[0]["finish_reason"] == "stop"
