"""A damaged adapter in the store, and a read-only store, under a real server (issue #24).

A request for a damaged adapter gets a 500 naming the file and the problem; listing, the other adapters and the
server go on. Both ways the server runs: the model in this process, and in an engine process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fault_injection import read_only
from serve_helpers import live_server

from prefixtune.adapter_folder import MANIFEST_FILE
from prefixtune.engine.lm import PrefixLM
from prefixtune.models import load_base_model
from prefixtune.prefix.peft_io import CONFIG_FILE, WEIGHTS_FILE

BODY = {"prompt": "Tell me", "max_tokens": 3, "temperature": 0}


def _damage(root: Path) -> dict[str, str]:
    """Copies of alpha, each damaged one way; name -> the file the error must name."""
    for name in ("cut", "garbage", "manifest", "config"):
        shutil.copytree(root / "alpha", root / name)
    weights = root / "cut" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "garbage" / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    (root / "manifest" / MANIFEST_FILE).write_text("[1, 2")
    (root / "config" / CONFIG_FILE).write_text("{")
    return {"cut": WEIGHTS_FILE, "garbage": WEIGHTS_FILE, "manifest": MANIFEST_FILE, "config": CONFIG_FILE}


@pytest.fixture(scope="module")
def damaged_lm(tmp_path_factory, tiny_model_dir, serve_store):
    root = tmp_path_factory.mktemp("damaged") / "store"
    shutil.copytree(serve_store, root)
    return PrefixLM(load_base_model(str(tiny_model_dir), device="cpu", dtype="float32"), root)


def _complete(http, model: str):
    return http.post("/v1/completions", json={"model": model, **BODY})


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_damaged_adapters_fail_alone_and_name_the_file(damaged_lm, engine_process):
    root = damaged_lm.store.root
    broken = _damage(root)
    try:
        with live_server(damaged_lm, engine_process=engine_process, max_tokens=4) as srv, srv.http() as http:
            good = _complete(http, "alpha")
            assert good.status_code == 200, good.text
            listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
            assert set(broken) | {"alpha", "beta"} <= listed, "listing goes on with damaged adapters in it"
            for name, file in broken.items():
                r = _complete(http, name)
                assert r.status_code == 500, (name, r.text)
                error = r.json()["error"]
                assert error["code"] == "adapter_damaged" and error["type"] == "server_error", error
                assert str(root / name / file) in error["message"], (name, error["message"])
                assert _complete(http, "alpha").json()["choices"][0]["text"] == good.json()["choices"][0]["text"]
            # Damaged after it was served: the cached copy is not used past the change; mending it heals.
            weights = root / "beta" / WEIGHTS_FILE
            saved = weights.read_bytes()
            assert _complete(http, "beta").status_code == 200
            weights.write_bytes(saved[:40])
            r = _complete(http, "beta")
            assert r.status_code == 500 and str(weights) in r.json()["error"]["message"], r.text
            weights.write_bytes(saved)
            assert _complete(http, "beta").status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        for name in broken:
            shutil.rmtree(root / name, ignore_errors=True)


def test_a_read_only_store_serves(damaged_lm, monkeypatch):
    root = damaged_lm.store.root
    with read_only(root, monkeypatch) as how, live_server(damaged_lm, max_tokens=4) as srv, srv.http() as http:
        assert _complete(http, "alpha").status_code == 200, how
        assert {"alpha", "beta"} <= {m["id"] for m in http.get("/v1/models").json()["data"]}
        reload = http.post("/v1/adapters", json={"name": "beta"})
        assert reload.status_code == 200, (how, reload.text)
        assert http.delete("/v1/adapters/alpha").status_code == 200  # unloading is in memory only
        assert http.post("/v1/adapters", json={"name": "alpha"}).status_code == 200
        assert _complete(http, "beta").status_code == 200
