"""Hot load/unload while serving, admin switches, queue limit (429), disconnects and body limits."""

from __future__ import annotations

import shutil
import threading
import time

import openai
import pytest
from serve_helpers import gated_model, live_server, slow_model, wait_for, write_adapter


def _complete(client, model, prompt="Tell me", n=8):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def _greedy(lm, model, prompt="Tell me", n=8):
    return lm.generate([prompt], model, max_new_tokens=n)[0].text


@pytest.fixture(scope="module")
def roots(tmp_path_factory, serve_base):
    allowed = tmp_path_factory.mktemp("allowed")
    write_adapter(allowed / "gamma", serve_base, "gamma", 5, seed=300)
    outside = tmp_path_factory.mktemp("outside")
    write_adapter(outside / "evil", serve_base, "evil", 3, seed=301)
    (allowed / "empty").mkdir()
    return allowed, outside


def test_hot_load_and_unload_while_serving(serve_lm, serve_store, serve_base, roots):
    allowed, outside = roots
    with live_server(serve_lm, adapter_roots=[allowed]) as srv, srv.http() as http:
        client = srv.client()
        with pytest.raises(openai.NotFoundError):
            _complete(client, "gamma")
        r = http.post("/v1/adapters", json={"name": "gamma", "path": str(allowed / "gamma")})
        assert r.status_code == 200 and r.json()["num_virtual_tokens"] == 5
        assert "gamma" in {m.id for m in client.models.list().data}
        served = _complete(client, "gamma")
        assert served == _greedy(srv.lm, "gamma") != _greedy(srv.lm, "alpha")

        assert http.delete("/v1/adapters/gamma").json()["deleted"] is True
        assert "gamma" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.NotFoundError):
            _complete(client, "gamma")

        # A store adapter can be taken out of service and put back without touching the disk.
        assert http.delete("/v1/adapters/alpha").status_code == 200
        with pytest.raises(openai.NotFoundError):
            _complete(client, "alpha")
        assert http.post("/v1/adapters", json={"name": "alpha"}).status_code == 200
        assert _complete(client, "alpha") == _greedy(srv.lm, "alpha")

        # An adapter written into the store while serving is listed and usable at once.
        write_adapter(serve_store / "delta", serve_base, "delta", 6, seed=302)
        try:
            assert "delta" in {m.id for m in client.models.list().data}
            assert _complete(client, "delta") == _greedy(srv.lm, "delta")
        finally:
            shutil.rmtree(serve_store / "delta")

        # Paths outside the allowed roots, bad folders and bad names are refused.
        assert http.post("/v1/adapters", json={"name": "evil", "path": str(outside / "evil")}).status_code == 403
        link = allowed / "sneaky"
        link.symlink_to(outside / "evil")
        assert http.post("/v1/adapters", json={"name": "sneaky", "path": str(link)}).status_code == 403
        bad = http.post("/v1/adapters", json={"name": "empty", "path": str(allowed / "empty")})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
        assert http.post("/v1/adapters", json={"name": "../x"}).json()["error"]["param"] == "name"
        assert http.post("/v1/adapters", json={"name": "nothere"}).status_code == 404
        assert http.delete("/v1/adapters/nothere").status_code == 404


def test_admin_can_be_disabled(serve_lm, roots):
    with live_server(serve_lm, admin=False, adapter_roots=[roots[0]]) as srv, srv.http() as http:
        assert http.post("/v1/adapters", json={"name": "gamma", "path": str(roots[0] / "gamma")}).status_code == 403
        assert http.delete("/v1/adapters/alpha").status_code == 403
        assert "alpha" in {m.id for m in srv.client().models.list().data}


def test_full_queue_answers_429(serve_lm):
    with live_server(serve_lm, max_batch=1, max_queue=1) as srv:
        client = srv.client()
        results = []

        def call():
            results.append(_complete(client, "beta", n=4))

        with gated_model(srv.lm) as gate:
            threads = [threading.Thread(target=call) for _ in range(2)]
            threads[0].start()
            wait_for(lambda: srv.scheduler.in_flight == 1 and srv.scheduler.waiting == 0, what="first admitted")
            threads[1].start()
            wait_for(lambda: srv.scheduler.waiting == 1, what="second queued")
            with pytest.raises(openai.RateLimitError) as err:
                _complete(client, "alpha")
            assert err.value.body["code"] == "queue_full"
            gate.set()
            for t in threads:
                t.join(30)
        assert len(results) == 2  # the admitted and the queued request both finish


def test_client_disconnect_mid_stream_frees_the_slot(serve_lm):
    with live_server(serve_lm, max_batch=1) as srv, slow_model(srv.lm, 0.005):
        client = srv.client()
        stats = srv.scheduler.stats
        stream = client.completions.create(model="alpha", prompt="Go on", max_tokens=200, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        # The worker drops the row, the output thread counts its finish: wait for both, not only the first.
        wait_for(lambda: srv.scheduler.in_flight == 0 and sum(stats.finished.values()) > 0,
                 what="the cancelled row to leave and be counted")
        assert stats.finished["cancelled"] == 1 and stats.finished["length"] == 0, dict(stats.finished)
        assert _complete(client, "beta", n=3)  # the freed slot serves the next request


def test_body_size_limit(serve_lm):
    with live_server(serve_lm, max_body_bytes=2000) as srv:
        with pytest.raises(openai.APIStatusError) as err:
            srv.client().completions.create(model="alpha", prompt="word " * 1000, max_tokens=2)
        assert err.value.status_code == 413
        with srv.http() as http:  # chunked upload without Content-Length is bounded too
            r = http.post("/v1/completions", content=iter([b"{" + b" " * 1500, b" " * 1500 + b"}"]),
                          headers={"content-type": "application/json"})
            assert r.status_code == 413
        assert _complete(srv.client(), "alpha", n=2)


def test_shutdown_ends_in_flight_streams_with_abort(serve_lm):
    with live_server(serve_lm, shutdown_timeout=0.3) as srv, slow_model(srv.lm, 0.005):
        stream = srv.client().completions.create(model="beta", prompt="Go on", max_tokens=200, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        start = time.monotonic()
        srv.server.should_exit = True  # what uvicorn's SIGTERM handler sets
        rest = list(chunks)  # ends with a final chunk and [DONE], not a cut connection
        assert rest[-1].choices[0].finish_reason == "abort"
        srv.thread.join(15)
        assert not srv.thread.is_alive() and time.monotonic() - start < 10
        assert srv.scheduler.stats.finished["abort"] == 1
