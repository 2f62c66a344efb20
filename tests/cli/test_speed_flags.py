"""The speed flags end to end: `generate --quantize int8|fp16` on the real CLI (adapters still apply, the output
stays close), bad values are usage errors before the model loads, and Ray refuses what it does not run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.testing import write_random_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("store")
    write_random_adapter(root, "a", tiny_lm, tokens=4, seed=1)
    return root


def _gen(tiny_model_dir, store, *extra):
    result = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--store", str(store), "-a", "a",
                                 "-a", "none", "--prompt", "The weather today is", "-n", "6", "--json", *extra])
    return result


def test_generate_quantized_keeps_the_adapters(tiny_model_dir, store):
    plain = _gen(tiny_model_dir, store)
    int8, fp16 = (_gen(tiny_model_dir, store, "--quantize", mode) for mode in ("int8", "fp16"))
    assert plain.exit_code == 0 and int8.exit_code == 0 and fp16.exit_code == 0, int8.output + fp16.output
    rows = json.loads(int8.stdout)
    assert [r["adapter"] for r in rows] == ["a", "none"] and all(r["completion_tokens"] == 6 for r in rows)
    assert rows[0]["tokens"] != rows[1]["tokens"]  # the prefix still steers the quantized base
    # int8 activations move a random tiny model's near-flat logits; fp16 weights leave its greedy tokens as they are.
    assert [r["tokens"] for r in json.loads(fp16.stdout)] == [r["tokens"] for r in json.loads(plain.stdout)]


def test_unknown_quantize_is_a_clear_error(tiny_model_dir, store):
    result = _gen(tiny_model_dir, store, "--quantize", "int3")
    assert result.exit_code == 2 and "unknown --quantize 'int3'; choose one of int8, fp16 or none" in result.output


def test_ray_backend_refuses_compile():
    result = runner.invoke(app, ["serve", "--backend", "ray", "--compile"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "--compile and --quantize serve the local backend" in result.output
