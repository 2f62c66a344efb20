"""The adapter store and its folders (adapter_folder.py) on real files: names, atomic writes, rename/rm,
compatibility, import/export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prefixtune.adapter_folder import (
    MANIFEST_FILE,
    Manifest,
    StoreError,
    check_compatible,
    shape_dict,
    validate_name,
    write_adapter_folder,
)
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
from prefixtune.prefix.peft_io import CONFIG_FILE, TRAINABLE_FILE, WEIGHTS_FILE, save_adapter
from prefixtune.prefix.shapes import ShapeMismatchError, prefix_shape
from prefixtune.store import AdapterStore, default_store, key_metric
from prefixtune.testing import make_tiny_model


def _write(root: Path, name: str, shape, fingerprint="f" * 16, base="tiny", tokens=3, metrics=None) -> Path:
    torch.manual_seed(len(name))
    config = PrefixConfig(num_virtual_tokens=tokens)  # with the MLP: all four files are written
    enc = PrefixEncoder(shape, config)
    manifest = Manifest(name=name, base_model=base, base_fingerprint=fingerprint, shape=shape_dict(shape),
                        prefix=config.to_dict(), metrics=metrics or {})
    return write_adapter_folder(root / name, enc.fold(), shape, config, manifest, enc)


@pytest.fixture(scope="module")
def shape():
    return prefix_shape(make_tiny_model("llama").config)


@pytest.mark.parametrize("name", ["emotion", "emotion-anger", "a_b.c", "V2", "x" * 128])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "a\\b", "..", "a..b", ".hidden", "-dash", "with space", "x" * 129, "none",
             "None", "é"],
)
def test_bad_names_are_rejected(tmp_path, name):
    with pytest.raises(StoreError, match="invalid adapter name"):
        validate_name(name)
    with pytest.raises(StoreError, match="invalid adapter name"):
        AdapterStore(tmp_path).path(name)
    assert not any(tmp_path.iterdir())


def test_crash_while_writing_leaves_nothing_visible(tmp_path, shape, monkeypatch):
    store = AdapterStore(tmp_path)
    _write(tmp_path, "keep", shape)
    before = (tmp_path / "keep" / WEIGHTS_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")  # after PEFT's files are written, before the manifest

    monkeypatch.setattr("prefixtune.adapter_folder.atomic_write_text", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, "new", shape)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, "keep", shape)  # an overwrite that crashes keeps the old adapter whole
    assert store.names() == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # temp folders cleaned up
    assert (tmp_path / "keep" / WEIGHTS_FILE).read_bytes() == before


def test_kill_while_deleting_the_replaced_adapter_keeps_the_new_one_whole(tmp_path, shape, monkeypatch):
    store = AdapterStore(tmp_path)
    _write(tmp_path, "keep", shape, tokens=3)

    def killed_rmtree(path, *args, **kwargs):  # deletes one file, then the process dies
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr("prefixtune.fileio.shutil.rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, "keep", shape, tokens=5)
    monkeypatch.undo()
    assert store.names() == ["keep"]
    assert {p.name for p in (tmp_path / "keep").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, TRAINABLE_FILE, MANIFEST_FILE}
    loaded, manifest = store.load("keep", shape)
    assert loaded.num_virtual_tokens == 5 and manifest.prefix["num_virtual_tokens"] == 5


def test_leftovers_of_killed_writes_are_never_listed(tmp_path, shape):
    store = AdapterStore(tmp_path)
    good = _write(tmp_path, "good", shape)
    shutil.copytree(good, tmp_path / ".half.tmp-123")  # what a SIGKILL mid-write leaves
    shutil.copytree(good, tmp_path / "not a valid name")  # copied in by hand
    (tmp_path / "plain-folder").mkdir()
    assert store.names() == ["good"]
    assert [a.name for a in store.list()] == ["good"]


def test_list_info_rename_remove(tmp_path, shape):
    store = AdapterStore(tmp_path / "store")
    assert store.names() == [] and store.list() == []  # a store that does not exist yet is empty
    _write(store.root, "a", shape, metrics={"eval_loss": 1.5, "eval_loss_own": 1.25})
    _write(store.root, "b", shape, tokens=5)
    info = store.info("a")
    assert info.size_bytes == sum(f.stat().st_size for f in info.path.iterdir())
    assert info.num_virtual_tokens == 3 and store.info("b").num_virtual_tokens == 5
    assert key_metric(info.manifest) == ("eval_loss_own", 1.25)
    assert key_metric(store.info("b").manifest) is None

    store.rename("a", "c")
    assert store.names() == ["b", "c"]
    assert json.loads((store.root / "c" / MANIFEST_FILE).read_text())["name"] == "c"
    with pytest.raises(StoreError, match="'b' already exists"):
        store.rename("c", "b")
    with pytest.raises(StoreError, match="invalid adapter name"):
        store.rename("c", "../outside")
    store.remove("b")
    assert store.names() == ["c"]
    assert sorted(p.name for p in store.root.iterdir()) == ["c"]
    with pytest.raises(StoreError, match=r"no adapter 'b' in .* \(adapters: c\)"):
        store.remove("b")


def test_check_compatible_names_both_models(shape):
    manifest = Manifest(name="emo", base_model="model-A", base_fingerprint="aaaa", shape=shape_dict(shape), prefix={})
    assert check_compatible(manifest, shape, "aaaa", "model-A") is None
    assert check_compatible(None, shape, "bbbb", "model-B") is None  # bare PEFT: shapes are checked on load
    with pytest.raises(StoreError) as err:
        check_compatible(manifest, shape, "bbbb", "model-B")
    for part in ("'emo'", "model-A", "aaaa", "model-B", "bbbb", "--force"):
        assert part in str(err.value)
    warning = check_compatible(manifest, shape, "bbbb", "model-B", force=True)
    assert warning.startswith("warning:") and "model-A" in warning and "model-B" in warning

    other = prefix_shape(make_tiny_model("gpt2").config)
    with pytest.raises(StoreError, match="shapes differ") as err:
        check_compatible(manifest, other, "bbbb", "gpt2-tiny", force=True)  # --force cannot cross shapes
    assert "model-A" in str(err.value) and "gpt2-tiny" in str(err.value)


def test_import_checks_shapes_and_export_is_a_fresh_folder(tmp_path, shape):
    gpt2 = prefix_shape(make_tiny_model("gpt2").config)
    peft_dir = tmp_path / "peft-gpt2"
    config = PrefixConfig(num_virtual_tokens=2, prefix_projection=False)
    save_adapter(peft_dir, PrefixEncoder(gpt2, config).fold(), gpt2, config, "gpt2")
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(ShapeMismatchError, match="does not match the base model"):
        store.import_adapter(peft_dir, "x", shape, "tiny-llama", "f" * 16)
    assert store.names() == []

    _write(store.root, "a", shape)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(StoreError, match="not an empty folder"):
        store.export("a", tmp_path / "full")
    (tmp_path / "empty").mkdir()
    store.export("a", tmp_path / "empty")  # an empty folder is fine
    exported = {p.name for p in (tmp_path / "empty").iterdir()}
    assert {CONFIG_FILE, WEIGHTS_FILE, TRAINABLE_FILE, MANIFEST_FILE} <= exported
    store.export("a", tmp_path / "deep" / "peft", peft_only=True)
    assert {p.name for p in (tmp_path / "deep" / "peft").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    assert not any(p.name.startswith(".") for p in (tmp_path / "deep").iterdir())


def test_corrupt_manifest_is_a_clear_error(tmp_path, shape):
    store = AdapterStore(tmp_path)
    _write(tmp_path, "a", shape)
    (tmp_path / "a" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="not a valid prefixtune manifest"):
        store.manifest("a")
    assert "not a valid prefixtune manifest" in store.info("a").problem


def test_default_store_follows_prefixtune_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path))
    assert default_store() == tmp_path / "adapters"
