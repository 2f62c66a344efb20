"""A damaged store, a full disk and a read-only store (issue #24): listing never fails on a damaged adapter,
a failed write leaves the store as it was and says what failed and the fix."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from fault_injection import fill_disk_after, read_only
from typer.testing import CliRunner

from prefixtune.adapter_folder import MANIFEST_FILE, ManifestError, StoreError
from prefixtune.cli import app
from prefixtune.prefix import peft_io
from prefixtune.prefix.peft_io import CONFIG_FILE, TRAINABLE_FILE, WEIGHTS_FILE, AdapterFormatError
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.store import AdapterStore
from prefixtune.testing import make_tiny_model
from test_store import _write

runner = CliRunner()


@pytest.fixture(scope="module")
def shape():
    return prefix_shape(make_tiny_model("llama").config)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage(root: Path) -> dict[str, str]:
    """Each kind of damage in its own adapter; name -> the file the problem must name."""
    (root / "cut" / WEIGHTS_FILE).write_bytes((root / "cut" / WEIGHTS_FILE).read_bytes()[:100])
    (root / "manifest" / MANIFEST_FILE).write_text('{"name": "manifest", "base_mo')
    (root / "config" / CONFIG_FILE).write_text("{not json")
    _truncate(root / "trainable" / TRAINABLE_FILE)
    (root / "empty" / WEIGHTS_FILE).write_bytes(b"")
    return {"cut": WEIGHTS_FILE, "manifest": MANIFEST_FILE, "config": CONFIG_FILE, "trainable": TRAINABLE_FILE,
            "empty": WEIGHTS_FILE}


@pytest.fixture
def damaged_store(tmp_path, shape):
    for name in ("good", "cut", "manifest", "config", "trainable", "empty", "zz-good"):
        _write(tmp_path, name, shape)
    return tmp_path, damage(tmp_path)


def test_listing_marks_each_damaged_adapter_and_names_the_file(damaged_store, shape):
    root, broken = damaged_store
    store = AdapterStore(root)
    items = {a.name: a for a in store.list()}
    assert sorted(items) == ["config", "cut", "empty", "good", "manifest", "trainable", "zz-good"]
    assert items["good"].problem is None and items["zz-good"].problem is None
    for name, file in broken.items():
        problem = items[name].problem
        assert problem is not None and str(root / name / file) in problem, (name, problem)
    assert "not a valid prefixtune manifest" in items["manifest"].problem
    with pytest.raises(ManifestError, match=MANIFEST_FILE):
        store.manifest("manifest")
    for name in ("cut", "empty"):  # loading says the same as listing
        with pytest.raises(AdapterFormatError, match=f"{name}/{WEIGHTS_FILE}: the weights file is unreadable"):
            store.load(name, shape)
    assert store.load("zz-good", shape)[0].flat.shape[0] == 3


def test_adapters_list_cli_marks_broken(damaged_store):
    root, broken = damaged_store
    result = runner.invoke(app, ["adapters", "list", "--store", str(root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in broken:
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        assert "BROKEN" in row, row
        assert any(line.startswith(f"broken: {name}: ") and broken[name] in line for line in lines), name
    good = next(line for line in lines if line.split() and line.split()[0] == "good")
    assert "BROKEN" not in good
    rows = json.loads(runner.invoke(app, ["adapters", "list", "--store", str(root), "--json"]).stdout)
    assert {r["name"] for r in rows if r["broken"]} == set(broken)
    shown = runner.invoke(app, ["adapters", "show", "manifest", "--store", str(root)])
    assert shown.exit_code == 0 and MANIFEST_FILE in json.loads(shown.stdout)["broken"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_while_publishing_leaves_the_store_as_it_was(tmp_path, shape, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    _write(store.root, "a", shape, metrics={"eval_loss": 9.0})  # the adapter the publish would replace
    new = {n: _write(tmp_path / "run", n, shape, tokens=5) for n in ("a", "b")}
    before = _tree(store.root)
    seen = fill_disk_after(monkeypatch, shutil, "copyfile", calls_ok=5)  # mid-way through the second adapter
    with pytest.raises(StoreError) as caught:
        store.put_all(new)
    message = str(caught.value)
    assert "cannot publish adapters a, b into the store" in message and str(store.root) in message
    assert "No space left on device (ENOSPC)" in message and "free space" in message
    assert len(seen) == 6 and "/.b.tmp-" in seen[-1], seen  # the disk filled while copying b's files
    assert _tree(store.root) == before, "the store is byte-for-byte unchanged, no hidden copy left behind"
    monkeypatch.undo()
    assert sorted(store.put_all(new)) == ["a", "b"]  # with space again the same publish goes through
    assert store.load("a", shape)[0].flat.shape[0] == 5


def test_disk_full_while_writing_an_adapter_keeps_the_old_one(tmp_path, shape, monkeypatch):
    _write(tmp_path, "a", shape)
    before = _tree(tmp_path)
    fill_disk_after(monkeypatch, peft_io, "save_file", calls_ok=0)
    with pytest.raises(StoreError, match=r"cannot write the adapter folder .*/a: No space left on device"):
        _write(tmp_path, "a", shape, tokens=5)
    assert _tree(tmp_path) == before


def test_read_only_store_serves_reads_and_refuses_writes_clearly(tmp_path, shape, monkeypatch):
    root = tmp_path / "store"
    for name in ("a", "b"):
        _write(root, name, shape)
    store = AdapterStore(root)
    before = _tree(root)
    with read_only(root, monkeypatch) as how:
        assert [a.problem for a in store.list()] == [None, None], how
        assert store.load("a", shape)[0].flat.shape[0] == 3
        failures = {
            "save": lambda: _write(root, "c", shape),
            "remove": lambda: store.remove("a"),
            "rename": lambda: store.rename("a", "z"),
            "publish": lambda: store.put_all({"a": root / "b"}),
            "guidance": lambda: store.set_guidance("a", {"scale": 2.0}),
        }
        for what, write in failures.items():
            with pytest.raises(StoreError) as caught:
                write()
            message = str(caught.value)
            assert "Read-only file system (EROFS)" in message and "writable folder" in message, (what, how, message)
            assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.EROFS
        cli = runner.invoke(app, ["adapters", "rm", "a", "--store", str(root)])
        assert cli.exit_code == 2 and cli.output.startswith("error: cannot remove adapter 'a'"), cli.output
    assert _tree(root) == before
