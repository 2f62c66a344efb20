"""`prefixtune adapters ...` end to end: the real CLI on real folders and a saved tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.models import model_fingerprint
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.model import PrefixModel, kv_from_flat
from prefixtune.prefix.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.store import MANIFEST_FILE, AdapterStore
from prefixtune.testing import make_tiny_model, write_random_adapter

runner = CliRunner()


def cli(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    return result


def write_adapter(root, name, loaded, tokens=3, metrics=None, **kwargs):
    return write_random_adapter(root, name, loaded, tokens=tokens, scale=1.0, metrics=metrics or {},
                                template="Emotion: {label}\nText:", **kwargs)


def test_list_empty_store(tmp_path, monkeypatch):
    out = cli("adapters", "list", "--store", tmp_path / "nothing-here").stdout
    assert "no adapters in" in out and "prefixtune train" in out
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path / "home"))  # the default store
    assert str(tmp_path / "home" / "adapters") in cli("adapters", "list").stdout
    assert json.loads(cli("adapters", "list", "--store", tmp_path, "--json").stdout) == []


def test_list_show_rename_rm(tmp_path, tiny_lm):
    store = tmp_path / "store"
    write_adapter(store, "emotion", tiny_lm, tokens=3, metrics={"eval_loss": 2.5, "eval_loss_own": 2.25})
    write_adapter(store, "emotion-anger", tiny_lm, tokens=6)
    out = cli("adapters", "list", "--store", store).stdout
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["name"] == ["name", "base", "model", "tokens", "size", "created", "metric"]
    size_kb = sum(p.stat().st_size for p in (store / "emotion").iterdir()) / 1000
    assert lines["emotion"][1:4] == [tiny_lm.name, "3", f"{size_kb:.1f}"]
    assert lines["emotion"][4] == "KB" and lines["emotion"][-2:] == ["loss", "2.25"]  # the adapter's own loss
    assert lines["emotion-anger"][2] == "6" and lines["emotion-anger"][-1] == "-"
    rows = json.loads(cli("adapters", "list", "--store", store, "--json").stdout)
    assert [r["name"] for r in rows] == ["emotion", "emotion-anger"]
    assert rows[0]["virtual_tokens"] == 3 and rows[0]["metric"] == {"eval_loss_own": 2.25}
    assert rows[0]["size_bytes"] == sum(p.stat().st_size for p in (store / "emotion").iterdir())

    shown = json.loads(cli("adapters", "show", "emotion", "--store", store).stdout)
    assert shown["manifest"]["base_fingerprint"] == tiny_lm.fingerprint
    assert shown["manifest"]["template"] == "Emotion: {label}\nText:"
    assert shown["peft_config"]["peft_type"] == "PREFIX_TUNING"
    assert {MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE} <= set(shown["files"])

    cli("adapters", "rename", "emotion", "joy", "--store", store)
    assert AdapterStore(store).names() == ["emotion-anger", "joy"]
    err = cli("adapters", "rename", "joy", "emotion-anger", "--store", store, code=2).output
    assert "error: adapter 'emotion-anger' already exists" in err
    cli("adapters", "rm", "joy", "emotion-anger", "--store", store)
    assert AdapterStore(store).names() == [] and not any(store.iterdir())
    err = cli("adapters", "show", "joy", "--store", store, code=2).output
    assert "error: no adapter 'joy'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ("show", "../etc"),
        ("rm", ".."),
        ("rename", "a", "x/y"),
        ("rename", "a", "none"),
        ("export", "a/../b", "out"),
        ("import", "somewhere", "--name", "../escape"),
    ],
)
def test_bad_names_are_rejected(tmp_path, tiny_lm, args):
    store = tmp_path / "store"
    write_adapter(store, "a", tiny_lm)
    result = cli("adapters", *args, "--store", store, code=2)
    assert "error: invalid adapter name" in result.output
    assert sorted(p.name for p in store.iterdir()) == ["a"] and not (tmp_path / "out").exists()


def test_import_peft_adapter_and_export_back(tmp_path, tiny_model_dir, tiny_lm):
    from peft import PeftModel, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    peft_model = get_peft_model(fresh(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    with torch.no_grad():  # a strong prefix: logits that ignored it could not match by accident
        peft_model.prompt_encoder["default"].embedding.weight.mul_(3.0)
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        base = fresh()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(theirs, base, atol=1e-3)
    peft_model.save_pretrained(tmp_path / "from-peft")

    store = tmp_path / "store"
    out = cli("adapters", "import", tmp_path / "from-peft", "--name", "imported", "--model", tiny_model_dir,
              "--store", store).stdout
    assert "imported" in out
    manifest = json.loads((store / "imported" / MANIFEST_FILE).read_text())
    assert manifest["base_fingerprint"] == tiny_lm.fingerprint and manifest["prefix"]["num_virtual_tokens"] == 5

    cli("adapters", "export", "imported", tmp_path / "exported", "--store", store)
    reloaded = PeftModel.from_pretrained(fresh(), tmp_path / "exported").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask).logits
        pm = PrefixModel(fresh())
        kv = kv_from_flat(load_adapter(store / "imported").flat, pm)
        ours = pm(ids, mask, prefixes=[kv, kv]).logits
    torch.testing.assert_close(again, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    err = cli("adapters", "export", "imported", tmp_path / "exported", "--store", store, code=2).output
    assert "not an empty folder" in err


def test_import_refuses_adapters_that_do_not_fit(tmp_path, tiny_model_dir, tiny_lm):
    gpt2 = prefix_shape(make_tiny_model("gpt2").config)
    config = PrefixConfig(num_virtual_tokens=2, prefix_projection=False)
    save_adapter(tmp_path / "gpt2-peft", PrefixEncoder(gpt2, config).fold(), gpt2, config, "gpt2")
    store = tmp_path / "store"
    err = cli("adapters", "import", tmp_path / "gpt2-peft", "--name", "g", "--model", tiny_model_dir,
              "--store", store, code=2).output
    assert "error:" in err and "does not match the base model" in err and "Traceback" not in err
    assert AdapterStore(store).names() == []

    other = tmp_path / "other"  # a prefixtune adapter of another llama: same shapes, other weights
    write_adapter(other, "theirs", tiny_lm, base="other-llama",
                  fingerprint=model_fingerprint(make_tiny_model("llama", seed=1)))
    err = cli("adapters", "import", other / "theirs", "--name", "t", "--model", tiny_model_dir,
              "--store", store, code=2).output
    assert "other-llama" in err and str(tiny_model_dir) in err and "--force" in err
    result = cli("adapters", "import", other / "theirs", "--name", "t", "--model", tiny_model_dir,
                 "--store", store, "--force")
    assert "loading anyway" in result.stderr and AdapterStore(store).names() == ["t"]
    err = cli("adapters", "import", other / "theirs", "--name", "t", "--model", tiny_model_dir, "--store", store,
              "--force", code=2).output
    assert "already exists" in err
    shutil.rmtree(other)
