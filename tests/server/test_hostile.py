"""Hostile or careless requests: strict types, invalid Unicode, every per-request limit, guidance fields,
adapter names from memory, and adapter folders that try to escape their root. Real server, real client."""

from __future__ import annotations

import os

import openai
import pytest
from serve_helpers import live_server, write_adapter

from prefixtune import fileio


@pytest.fixture(scope="module")
def server(serve_lm):
    with live_server(serve_lm, max_batch=4, max_model_len=128, max_prompt_tokens=40, max_n=3, max_stop_chars=16,
                     max_inflight_tokens=600) as srv:
        yield srv


def _post(server, body, raw: bytes | None = None):
    with server.http() as http:
        if raw is not None:
            return http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        return http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2, **body})


@pytest.mark.parametrize("body, param", [
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"),
    ({"n": 1.0}, "n"),
    ({"seed": True}, "seed"),
    ({"stop": ["x" * 17]}, "stop"),  # longer than max_stop_chars
    ({"n": 4}, "n"),  # more than max_n
    ({"prompt": "word " * 60}, "prompt"),  # more tokens than max_prompt_tokens
    ({"max_tokens": 100, "prompt": ["a b c"] * 3, "n": 3}, "max_tokens"),  # alone beyond max_inflight_tokens
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": "0.1"}, "min_p"),
    ({"guidance_negative": "nobody"}, "guidance_negative"),
    ({"guidance_negative": "alpha", "guidance_scale": 2.0}, "guidance_negative"),  # the adapter itself
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = _post(server, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_min_p_one_samples_the_greedy_tokens(server):
    greedy = _post(server, {"temperature": 0, "max_tokens": 6})
    sure = _post(server, {"temperature": 1.0, "min_p": 1.0, "max_tokens": 6, "seed": 3})
    assert greedy.status_code == sure.status_code == 200, sure.text
    assert sure.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_limits_name_the_setting(server):
    for body, setting in [({"stop": ["x" * 17]}, "max_stop_chars"), ({"n": 4}, "max_n"),
                          ({"prompt": "word " * 60}, "max_prompt_tokens"),
                          ({"stop": list("abcde")}, "max_stop_strings")]:
        assert setting in _post(server, body).json()["error"]["message"]


def test_lone_surrogates_and_broken_json_are_400(server):
    for raw in [b'{"model": "alpha", "prompt": "\\ud800", "max_tokens": 2}',
                b'{"model": "alpha", "prompt": ["ok", "\\udfff"], "max_tokens": 2}',
                b'{"model": "alpha", "prompt": "hi", "stop": "\\ud83d", "max_tokens": 2}',
                b'{"model": "alpha", "prompt": "hi", "temperature": NaN}',
                b'{"model": "alpha", "prompt": "hi", "max_tokens": Infinity}',
                b'{"model": "alpha", "prompt": ', b'\xff\xfe']:
        r = _post(server, None, raw)
        assert r.status_code == 400, (raw, r.status_code, r.text)
        assert "error" in r.json()
    with server.http() as http:
        chat = {"model": "alpha", "messages": [{"role": "user", "content": "\ud800"}]}
        import json

        body = json.dumps(chat).encode()  # json.dumps escapes the lone surrogate as \ud800
        assert http.post("/v1/chat/completions", content=body,
                         headers={"Content-Type": "application/json"}).status_code == 400
        assert http.get("/health").status_code == 200


def test_guided_request_over_http_is_one_choice_and_matches_offline(server):
    client = server.client()
    prompt = "The cat sat on the mat and"
    offline = server.lm.generate([prompt], "alpha", max_new_tokens=8, guidance_scale=3.0)[0]
    out = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"guidance_scale": 3.0, "guidance_negative": "none"})
    assert out.choices[0].text == offline.text and len(out.choices) == 1
    assert out.usage.completion_tokens == len(offline.tokens)
    negative = server.lm.generate([prompt], "alpha", max_new_tokens=8, guidance_scale=3.0,
                                  guidance_negative="beta")[0]
    chunks = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, stream=True,
                                            extra_body={"guidance_scale": 2.0, "guidance_negative": "beta"})
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    again = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"guidance_scale": 3.0, "guidance_negative": "beta"})
    assert again.choices[0].text == negative.text


def test_in_flight_token_budget_gives_429_when_busy(serve_lm):
    with live_server(serve_lm, max_batch=2, max_inflight_tokens=40) as srv:
        from serve_helpers import gated_model

        client = srv.client()
        with gated_model(serve_lm) as gate:
            import threading

            first = threading.Thread(target=client.completions.create,
                                     kwargs=dict(model="alpha", prompt="hi there", max_tokens=30, temperature=0))
            first.start()
            from serve_helpers import wait_for

            wait_for(lambda: srv.scheduler.in_flight == 1, what="first request in flight")
            with pytest.raises(openai.RateLimitError) as err:
                client.completions.create(model="alpha", prompt="hi there", max_tokens=20)
            assert "max_inflight_tokens" in err.value.body["message"]
            gate.set()
            first.join(30)


def test_model_names_come_from_memory(server, monkeypatch):
    calls = []
    original = server.lm.store.names
    monkeypatch.setattr(server.lm.store, "names", lambda: calls.append(1) or original())
    client = server.client()
    for _ in range(5):
        assert {"alpha", "beta"} <= {m.id for m in client.models.list().data}
        client.completions.create(model="beta", prompt="hi", max_tokens=1)
    assert len(calls) <= 1  # listed again only if the store folder changed (or RESCAN_S passed)


def test_adapter_files_that_are_symlinks_out_of_the_root_are_refused(serve_lm, serve_base, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_adapter(outside / "evil", serve_base, "evil", 3, seed=301)
    write_adapter(allowed / "good", serve_base, "good", 5, seed=302)
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    for item in (outside / "evil").iterdir():
        (sneaky / item.name).symlink_to(item)  # the folder is inside; its files point outside
    with live_server(serve_lm, adapter_roots=[allowed]) as srv, srv.http() as http:
        r = http.post("/v1/adapters", json={"name": "sneaky", "path": str(sneaky)})
        assert r.status_code == 403 and "symbolic link" in r.json()["error"]["message"]
        assert http.post("/v1/adapters", json={"name": "good", "path": str(allowed / "good")}).status_code == 200
        expected = serve_lm.generate(["Tell me"], "good", max_new_tokens=6)[0].text
        # The served adapter is the copy read at load time: swapping the folder afterwards changes nothing.
        os.rename(allowed / "good", allowed / "good-old")
        os.symlink(outside / "evil", allowed / "good")
        out = srv.client().completions.create(model="good", prompt="Tell me", max_tokens=6, temperature=0)
        assert out.choices[0].text == expected
        assert http.post("/v1/adapters", json={"name": "good", "path": str(allowed / "good")}).status_code == 403
        assert http.delete("/v1/adapters/good").status_code == 200


def test_umask_is_read_without_being_set(monkeypatch):
    def refuse(_mask):
        raise AssertionError("os.umask changes the process umask for every thread")

    expected = fileio.current_umask()
    monkeypatch.setattr(os, "umask", refuse)
    assert fileio.current_umask() == expected
