"""Fixtures for the serving tests: a tiny model and a store with two adapters of different prefix lengths.
The server itself (real uvicorn on a free loopback port) comes from serve_helpers.live_server."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import ADAPTERS, write_adapter

from prefixtune.engine.lm import PrefixLM
from prefixtune.models import LoadedModel, load_base_model
from prefixtune.testing import save_tiny_model


@pytest.fixture(scope="session")
def serve_base(tiny_model_dir: Path) -> LoadedModel:
    """Read-only: used to build adapters, never to serve."""
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def serve_store(tmp_path_factory: pytest.TempPathFactory, serve_base: LoadedModel) -> Path:
    root = tmp_path_factory.mktemp("serve-store")
    for i, (name, p) in enumerate(ADAPTERS.items()):
        write_adapter(root / name, serve_base, name, p, seed=100 + i)
    return root


@pytest.fixture(scope="module")
def serve_lm(tiny_model_dir: Path, serve_store: Path) -> PrefixLM:
    """One PrefixLM per test module (hot-load tests register adapters on it; forward hooks come and go)."""
    return PrefixLM(load_base_model(str(tiny_model_dir), device="cpu", dtype="float32"), serve_store)


@pytest.fixture(scope="module")
def sharp_lm(tmp_path_factory: pytest.TempPathFactory) -> PrefixLM:
    """A tiny llama whose attention depends on content (make_tiny_model(sharp=True)) with the same adapters:
    there a beam that continues another beam's history decodes differently, so a lost fork shows."""
    root = tmp_path_factory.mktemp("sharp")
    loaded = load_base_model(str(save_tiny_model(root / "model", sharp=True)), device="cpu", dtype="float32")
    for i, (name, p) in enumerate(ADAPTERS.items()):
        write_adapter(root / "store" / name, loaded, name, p, seed=100 + i)
    return PrefixLM(loaded, root / "store")
