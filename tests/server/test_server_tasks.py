"""The `inputs` extension of /v1/completions fills a task adapter's template, as `generate --input` does."""

from __future__ import annotations

import pytest
from serve_helpers import live_server

from prefixtune.testing import write_random_adapter

TEMPLATE = "Record: {mr}\nSentence:"


@pytest.fixture(scope="module")
def task_lm(serve_lm, serve_base, tmp_path_factory):
    folder = write_random_adapter(tmp_path_factory.mktemp("task-store"), "e2e", serve_base, tokens=5, seed=7,
                                  scale=10.0, template=TEMPLATE, fields=["mr"])
    serve_lm.register("e2e", folder)
    yield serve_lm
    serve_lm.unload("e2e")


def test_inputs_fill_the_template_like_offline_generate(task_lm):
    inputs = {"mr": "name[The Eagle], food[French]"}
    offline = task_lm.generate([task_lm.render("", "e2e", inputs=inputs)], ["e2e"], max_new_tokens=6)[0]
    assert task_lm.render("", "e2e", inputs=inputs) == "Record: name[The Eagle], food[French]\nSentence:"
    with live_server(task_lm) as server, server.http() as http:
        r = http.post("/v1/completions", json={"model": "e2e", "prompt": "", "inputs": inputs, "max_tokens": 6,
                                               "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline.text
        missing = http.post("/v1/completions", json={"model": "e2e", "prompt": "", "inputs": {"name": "x"}})
        assert missing.status_code == 400 and "mr" in missing.json()["error"]["message"]
        assert missing.json()["error"]["param"] == "inputs"
        base = http.post("/v1/completions", json={"model": "tiny-base", "prompt": "", "inputs": inputs})
        assert base.status_code == 400 and "base model" in base.json()["error"]["message"]
        plain = http.post("/v1/completions", json={"model": "alpha", "prompt": "", "inputs": inputs})
        assert plain.status_code == 400 and "task template" in plain.json()["error"]["message"]
