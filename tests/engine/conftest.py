"""The engine tests' shared PrefixLM over a store of random adapters."""

from __future__ import annotations

import pytest

from prefixtune.engine.lm import PrefixLM
from prefixtune.models import LoadedModel
from prefixtune.testing import write_random_store


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, tiny_lm: LoadedModel) -> PrefixLM:
    """PrefixLM on the tiny llama over random adapters "a" (4 virtual tokens) and "b" (7), testing.ADAPTER_PAIR.

    Module-scoped: a module's tests share one engine and its adapter LRU, never another module's."""
    return PrefixLM(tiny_lm, write_random_store(tmp_path_factory.mktemp("store"), tiny_lm))
