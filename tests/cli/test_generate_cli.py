"""`prefixtune generate` end to end: the real CLI, a saved tiny model and a real store."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.models import model_fingerprint
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.store import AdapterStore
from prefixtune.testing import make_tiny_model, write_random_adapter as write_adapter

runner = CliRunner()
PROMPT = "The weather today is"


def cli(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("store")
    write_adapter(root, "a", tiny_lm, tokens=4, seed=1)
    write_adapter(root, "b", tiny_lm, tokens=9, seed=2)
    write_adapter(root, "foreign", tiny_lm, seed=3, base="other-llama",
                  fingerprint=model_fingerprint(make_tiny_model("llama", seed=1)))
    gpt2 = make_tiny_model("gpt2")
    write_adapter(root, "gpt2-adapter", tiny_lm, seed=4, base="tiny-gpt2", fingerprint=model_fingerprint(gpt2),
                  shape=prefix_shape(gpt2.config))
    return root


def gen(model_dir, store, *args, code=0):
    return cli("generate", "--model", model_dir, "--store", store, "--device", "cpu", *args, code=code)


def gen_json(model_dir, store, *args):
    return json.loads(gen(model_dir, store, *args, "--json").stdout)


def test_mixed_generate_equals_per_adapter_runs(tiny_model_dir, store):
    mixed = gen_json(tiny_model_dir, store, "-a", "a", "-a", "b", "-a", "none", "--prompt", PROMPT, "-n", "8")
    assert [r["adapter"] for r in mixed] == ["a", "b", "none"]
    for row in mixed:
        alone = gen_json(tiny_model_dir, store, "--adapter", row["adapter"], "--prompt", PROMPT, "-n", "8")
        assert len(alone) == 1 and alone[0]["tokens"] == row["tokens"] and alone[0]["text"] == row["text"]
        assert row["completion_tokens"] == 8 and row["finish_reason"] == "length" and row["prompt"] == PROMPT
    assert len({tuple(r["tokens"]) for r in mixed}) == 3, "each adapter must change the output"
    default = gen_json(tiny_model_dir, store, "--prompt", PROMPT, "-n", "8")  # no --adapter = base model
    assert default[0]["adapter"] == "none" and default[0]["tokens"] == mixed[2]["tokens"]


def test_adapter_path_outside_the_store(tiny_model_dir, store, tmp_path):
    outside = shutil.copytree(store / "b", tmp_path / "elsewhere" / "my-b")
    rows = gen_json(tiny_model_dir, store, "-a", "b", "--adapter-path", outside, "--prompt", PROMPT, "-n", "6")
    assert rows[1]["adapter"] == str(outside) and rows[1]["tokens"] == rows[0]["tokens"]
    err = gen(tiny_model_dir, store, "--adapter-path", tmp_path / "missing", "-p", "x", code=2).output
    assert "error: --adapter-path" in err and "not a folder" in err


def test_incompatible_adapter_is_refused(tiny_model_dir, store):
    err = gen(tiny_model_dir, store, "-a", "foreign", "-p", PROMPT, code=2).output
    assert "error: adapter 'foreign' was trained on base model 'other-llama'" in err
    assert str(tiny_model_dir) in err and "--force" in err and "Traceback" not in err
    forced = gen(tiny_model_dir, store, "-a", "foreign", "-p", PROMPT, "-n", "3", "--force", "--json")
    assert "loading anyway (--force)" in forced.stderr and len(json.loads(forced.stdout)) == 1
    err = gen(tiny_model_dir, store, "-a", "gpt2-adapter", "-p", PROMPT, "--force", code=2).output
    assert "'tiny-gpt2'" in err and "shapes differ" in err and str(tiny_model_dir) in err


@pytest.mark.parametrize(
    "args, message",
    [
        (("-a", "../a", "-p", "x"), "invalid adapter name"),
        (("-a", "missing", "-p", "x"), "no adapter 'missing'"),
        (("-a", "a"), "give --prompt, --label, or both"),
        (("-a", "a", "-p", "x", "--top-p", "0"), "top_p"),
        (("-a", "a", "-p", "x", "--temperature", "-1"), "temperature"),
        (("-a", "a", "-p", "x", "--label", "joy"), "no training template"),
        (("-p", "x", "--label", "joy"), "the base model has none"),
    ],
)
def test_user_errors_are_one_line(tiny_model_dir, store, args, message):
    err = gen(tiny_model_dir, store, *args, code=2).output
    assert "error:" in err and message in err and "Traceback" not in err


def test_text_output_stop_sampling_and_chat(tiny_model_dir, store):
    full = gen_json(tiny_model_dir, store, "-a", "a", "-p", PROMPT, "-n", "12")[0]
    stop = full["text"][len(full["text"]) // 2:][:3]
    cut = gen_json(tiny_model_dir, store, "-a", "a", "-p", PROMPT, "-n", "12", "--stop", stop)[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].find(stop)]

    sampled = [gen_json(tiny_model_dir, store, "-a", "a", "-p", PROMPT, "-n", "6", "-t", "1.0", "--top-k", "50",
                        "--top-p", "0.9", "--seed", str(seed))[0]["tokens"] for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]

    text = gen(tiny_model_dir, store, "-a", "a", "-a", "none", "-p", PROMPT, "-n", "5").stdout
    assert "── a · 4 prompt + 5 generated tokens · length ──" in text and "── none ·" in text
    assert text.count(PROMPT) == 2

    chat = gen_json(tiny_model_dir, store, "-a", "a", "-p", "hello", "-n", "3", "--chat")[0]
    assert chat["prompt_tokens"] > 5  # the template's role markers around the one-token prompt


def test_trained_adapter_with_label(tiny_model_dir, tmp_path):
    """The whole path: train a tiny adapter into a store, list it, generate with its own template."""
    from prefixtune.train import TrainConfig
    from prefixtune.train.run import train

    rows = [{"text": f"sample text number {i} about feelings", "label": ("joy", "anger")[i % 2]} for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    train(TrainConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "run"), store=str(store),
                      name="emo", max_steps=3, batch_size=4, num_virtual_tokens=4, eval_every=0, eval_examples=4,
                      progress=False, device="cpu", dtype="float32"), say=lambda *a: None)
    assert AdapterStore(store).names() == ["emo"]
    listed = json.loads(cli("adapters", "list", "--store", store, "--json").stdout)
    assert listed[0]["base_model"] == str(tiny_model_dir) and listed[0]["virtual_tokens"] == 4

    rows = gen_json(tiny_model_dir, store, "-a", "emo", "-a", "none", "--label", "joy", "-n", "4")
    assert [r["prompt"] for r in rows] == ["Emotion: joy\nText:"] * 2  # the base row gets the same prompt
    err = gen(tiny_model_dir, store, "-a", "emo", "--label", "fear", "-n", "2", code=2).output
    assert "knows labels" in err and "joy" in err


@pytest.mark.parametrize("mode", ["guidance", "concat"])
def test_composed_adapter_row_beside_others(tiny_model_dir, store, tiny_lm, mode):
    from prefixtune.engine.lm import PrefixLM

    rows = gen_json(tiny_model_dir, store, "-a", "a", "-a", "a+b", "--compose-mode", mode, "--compose-weights"
                    if mode == "guidance" else "-g", *(["2,0.5"] if mode == "guidance" else ["1"]), "--prompt",
                    PROMPT, "-n", "8")
    assert [r["adapter"] for r in rows] == ["a", "a+b"]
    lm = PrefixLM(tiny_lm, AdapterStore(store))
    kw = {"compose_weights": [2.0, 0.5]} if mode == "guidance" else {"guidance_scale": 1.0}
    expected = lm.generate([PROMPT], [("a", "b")], max_new_tokens=8, compose_mode=mode, **kw)[0]
    assert rows[1]["tokens"] == expected.tokens and rows[1]["tokens"] != rows[0]["tokens"]


def test_best_of_prints_the_most_evident_samples(tiny_model_dir, store, tiny_lm):
    from prefixtune.engine.lm import PrefixLM

    args = ["--prompt", PROMPT, "-n", "8", "-t", "1", "--seed", "3", "--compose-weights", "2,2"]
    rows = gen_json(tiny_model_dir, store, "-a", "a+b", "--best-of", "3", "--num-samples", "2", *args)
    lm = PrefixLM(tiny_lm, AdapterStore(store))
    expected = lm.generate([PROMPT], "a+b", max_new_tokens=8, temperature=1.0, seed=3, num_samples=2, best_of=3,
                           compose_weights=[2.0, 2.0])
    assert [r["tokens"] for r in rows] == [g.tokens for g in expected]
    assert rows[0]["score"] >= rows[1]["score"]
    err = gen(tiny_model_dir, store, "-a", "a", "--best-of", "2", "-t", "1", "-p", PROMPT, code=2).output
    assert "best_of ranks samples by a composed adapter's evidence" in err


def test_bad_composed_adapters_are_refused(tiny_model_dir, store):
    assert "no adapter 'nope'" in gen(tiny_model_dir, store, "-a", "a+nope", "-p", PROMPT, code=2).output
    assert "max_compose" in gen(tiny_model_dir, store, "-a", "a+b+foreign", "--max-compose", "2", "-p", PROMPT,
                                code=2).output
    assert "gpt2-adapter" in gen(tiny_model_dir, store, "-a", "a+gpt2-adapter", "-p", PROMPT, code=2).output
