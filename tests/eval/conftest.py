"""Fixtures for the evaluation tests: separable tiny labelled data, a trained tiny store, the CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalhelpers import run_cli, write_data


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_data(tmp_path / "data")


@pytest.fixture
def eval_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $PREFIXTUNE_HOME so judges cached by a test never land in the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("PREFIXTUNE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """A store with a per-label family emotion-<label> and one label-in-prompt adapter `single`."""
    from prefixtune.train.config import TrainConfig
    from prefixtune.train.run import train

    root = tmp_path_factory.mktemp("eval-store")
    data = write_data(root / "data", reference=True)
    store = root / "store"
    common = dict(model=str(tiny_model_dir), data=str(data), store=str(store), max_steps=2, batch_size=6,
                  num_virtual_tokens=4, eval_every=0, eval_examples=6, lr=1e-2, progress=False, device="cpu",
                  dtype="float32")
    train(TrainConfig(out=str(root / "fam"), name="emotion", per_label=True, **common), say=lambda *a: None)
    train(TrainConfig(out=str(root / "single"), name="single", **common), say=lambda *a: None)
    # Plain text (no labels, no template); only its test split carries references.
    plain = root / "plain"
    plain.mkdir()
    (plain / "train.jsonl").write_text("".join(json.dumps({"text": f"plain line {i} here"}) + "\n"
                                               for i in range(24)))
    (plain / "test.jsonl").write_text("".join(json.dumps({"text": f"plain test {i}", "ref": f"ref {i}"}) + "\n"
                                              for i in range(4)))
    train(TrainConfig(out=str(root / "plainrun"), name="plain", **{**common, "data": str(plain)}),
          say=lambda *a: None)
    return {"root": root, "data": data, "store": store, "model": tiny_model_dir, "plain": plain}


@pytest.fixture
def cli():
    return run_cli
