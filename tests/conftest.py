"""Shared fixtures. Model builders live in prefixtune.testing so they are importable anywhere.

The SmolLM2 safetensors cache under $PREFIXTUNE_HOME (default ~/.cache/prefixtune) is deliberately NOT
redirected: the one-time GGUF conversion (~40 s) then happens once per machine, not once per test run.
Session-scoped objects are shared by every test: do not mutate them (copy or build your own instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from prefixtune.models import LoadedModel, load_base_model
from prefixtune.testing import make_tiny_tokenizer, save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tests run tiny models: with 2 intra-op threads on a busy 2-core machine every op waits for the
    second thread to be scheduled (measured: a small mul 0.02 ms on one thread, 6.5 ms on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer llama (seed 0) + SmolLM2 tokenizer; pass it anywhere a --model path is accepted."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path) -> Iterator[LoadedModel]:
    """load_base_model(tiny_model_dir) on CPU/fp32: frozen, eval mode, left-padding tokenizer."""
    yield load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh copy of the SmolLM2 tokenizer (49152 tokens, chat template), safe to mutate."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def emotion_dir() -> Path:
    """The shared real emotion data (train/validation/test .jsonl); skips the test when absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion"
    if not (path / "train.jsonl").is_file():
        pytest.skip(f"shared emotion data not found at {path}")
    return path


# The longest test files, longest first (per-file totals of a full `make test` run on the 2-core dev machine).
# `--dist loadfile` runs each file whole on one worker and hands files out in collection order (the Makefile
# turns off xdist's reordering by test count, which put these one-test files last): started first, they run
# beside the many short files instead of leaving one worker alone at the end. Update when --durations changes.
LONGEST_FIRST = (
    "tests/server/test_smollm2_controls.py",
    "tests/test_models.py",
    "tests/bench/test_bench_serve_http.py",
    "tests/server/test_engine_process.py",
    "tests/eval/test_compare_full.py",
    "tests/bench/test_bench_soak.py",
    "tests/server/test_ray_serve.py",
    "tests/train/test_distributed.py",
    "tests/engine/test_compiled.py",
    "tests/bench/test_bench_smoke.py",
    "tests/train/test_training.py",
    "tests/server/test_supervisor.py",
    "tests/server/test_lm_eval.py",
    "tests/server/test_serve_cli.py",
    "tests/eval/test_compare_cli.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole
