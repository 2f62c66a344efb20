"""The server as `prefixtune serve` runs it by default: the model in an engine process (engine/core.py), the
HTTP front end holding a shell of it (engine/client.py). Greedy outputs, stops, cancels, beams, guidance and
admin loads must behave exactly as with the in-process Scheduler the rest of tests/server uses."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import live_server, wait_for

from prefixtune.engine import client as client_module
from prefixtune.engine.client import EngineClient, EngineSpec
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.models import ModelLoadError
from prefixtune.testing import write_random_adapter

PROMPTS = {"alpha": "I feel so happy today because", "beta": "The weather was", "tiny-base": "Once upon a time"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-process-roots")


@pytest.fixture(scope="module")
def server(serve_lm, roots):
    with live_server(serve_lm, engine_process=True, max_batch=8, max_model_len=128, adapter_roots=[roots]) as srv:
        yield srv


def _offline(lm, prompt, model, n=12, **kw):
    return lm.generate([prompt], None if model == "tiny-base" else model, max_new_tokens=n, temperature=0.0,
                       **kw)[0]


def _idle(server) -> None:
    """The core has no row left: a cancel or a stop reached it and freed the batch slot."""
    wait_for(lambda: server.scheduler.in_flight == 0, what="no request in flight")
    with server.http() as http:
        wait_for(lambda: http.get("/health").json()["running"] == 0, what="the core's batch empty")


def test_the_model_runs_in_another_process_and_outputs_equal_offline(server, serve_lm):
    assert server.scheduler.process.pid != os.getpid() and server.scheduler.process.is_alive()
    assert server.lm.model.device.type == "meta"  # the front end holds no weights
    client = server.client()

    def call(job):
        model, stream = job
        kwargs = dict(model=model, prompt=PROMPTS[model], max_tokens=12, temperature=0)
        if not stream:
            choice = client.completions.create(**kwargs).choices[0]
            return choice.text, choice.finish_reason
        chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    jobs = [(model, stream) for model in PROMPTS for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: rows of three models share the core's batches
        got = list(pool.map(call, jobs))
    offline = {m: _offline(serve_lm, p, m) for m, p in PROMPTS.items()}
    assert len({g.text for g in offline.values()}) == 3
    assert got == [(offline[m].text, offline[m].finish_reason) for m, _ in jobs]
    with server.http() as http:
        metrics = http.get("/metrics").text
    assert "prefixtune_decode_steps_total" in metrics and server.scheduler.stats.steps > 0
    assert server.scheduler.stats.finished["length"] >= len(jobs)  # counted by the front end's output stage
    _idle(server)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_found_in_the_front_end_frees_the_row_in_the_core(server, serve_lm, stream):
    full = _offline(serve_lm, PROMPTS["alpha"], "alpha", n=40).text
    stop = full[len(full) // 3: len(full) // 3 + 3]
    kwargs = dict(model="alpha", prompt=PROMPTS["alpha"], max_tokens=40, temperature=0, stop=[stop])
    client = server.client()
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    else:
        text = client.completions.create(**kwargs).choices[0].text
    assert text == full[: full.find(stop)]
    _idle(server)


def test_a_client_leaving_mid_stream_cancels_its_row_in_the_core(server):
    body = {"model": "beta", "prompt": "Go on and on", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.root, timeout=30) as http, http.stream("POST", "/v1/completions",
                                                                             json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    _idle(server)
    assert server.scheduler.stats.finished["cancelled"] >= 1


def test_guided_and_beam_requests_equal_offline(server, serve_lm):
    client = server.client()
    guided = client.completions.create(model="alpha", prompt=PROMPTS["alpha"], max_tokens=10, temperature=0,
                                       extra_body={"guidance_scale": 2.0})
    offline = _offline(serve_lm, PROMPTS["alpha"], "alpha", n=10, guidance_scale=2.0)
    assert guided.choices[0].text == offline.text != _offline(serve_lm, PROMPTS["alpha"], "alpha", n=10).text
    beams = client.completions.create(model="beta", prompt=PROMPTS["beta"], max_tokens=8, temperature=0,
                                      extra_body={"num_beams": 3})
    assert beams.choices[0].text == _offline(serve_lm, PROMPTS["beta"], "beta", n=8, num_beams=3).text


def test_admin_load_by_path_and_unload_reach_the_core(server, serve_lm, roots):
    folder = write_random_adapter(roots, "gamma", serve_lm.loaded, tokens=5, seed=3, scale=10.0)
    client = server.client()
    with server.http() as http:
        assert http.post("/v1/adapters", json={"name": "gamma", "path": str(folder)}).status_code == 200
        text = client.completions.create(model="gamma", prompt="Hello", max_tokens=8, temperature=0).choices[0].text
        serve_lm.register("gamma", folder)
        try:
            assert text == _offline(serve_lm, "Hello", "gamma", n=8).text
        finally:
            serve_lm.unload("gamma")
        assert http.delete("/v1/adapters/gamma").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="Hello", max_tokens=2)


def test_an_engine_process_that_dies_fails_its_requests_health_and_admin_at_once(serve_lm):
    # One engine process for both halves (each start costs ~10 s): killed mid-stream, then the dead core's admin.
    with live_server(serve_lm, engine_process=True, max_batch=4, max_model_len=128) as srv:
        client = srv.client()
        stream = client.completions.create(model="alpha", prompt="Go", max_tokens=100, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        srv.scheduler.process.kill()
        with pytest.raises(openai.APIError, match="engine process exited"):
            for _ in stream:
                pass
        with srv.http() as http:
            wait_for(lambda: http.get("/health").status_code == 503, what="health 503")
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="alpha", prompt="Go", max_tokens=2)
        assert err.value.status_code == 503

        wait_for(lambda: not srv.scheduler.alive, what="the client notices the dead core")
        with srv.http() as http:
            start = time.monotonic()
            load = http.post("/v1/adapters", json={"name": "alpha"}, timeout=30)
            assert time.monotonic() - start < 1.0 and load.status_code == 503
            assert http.delete("/v1/adapters/beta", timeout=30).status_code == 503
            assert "beta" in [m["id"] for m in http.get("/v1/models").json()["data"]]  # the unload changed nothing
        assert _served_within(client, 1.0, model="beta", prompt="Hello") == 503


def test_a_model_that_cannot_load_raises_its_own_error_in_the_front_end(tmp_path):
    with pytest.raises(ModelLoadError):
        EngineClient(EngineSpec(str(tmp_path / "no-such-model"), str(tmp_path)))


def _served_within(client, seconds: float, **kwargs):
    """A completion's (status, seconds): served (200) or refused (503), but answered."""
    start = time.monotonic()
    try:
        client.completions.create(max_tokens=4, temperature=0, timeout=30, **kwargs)
        status = 200
    except openai.APIStatusError as err:
        status = err.status_code
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"answered after {elapsed:.2f} s"
    return status


def test_a_core_that_never_answers_an_admin_load_blocks_no_request(serve_lm, monkeypatch):
    monkeypatch.setattr(client_module, "ADAPTER_TIMEOUT_S", 4.0)
    with live_server(serve_lm, engine_process=True, max_batch=4, max_model_len=128) as srv:
        client = srv.client()
        assert _served_within(client, 30, model="beta", prompt="warm up") == 200
        engine, send = srv.scheduler, srv.scheduler._send
        monkeypatch.setattr(engine, "_send", lambda m: None if m[0] == "adapter" else send(m))  # a stalled core
        with srv.http() as http, ThreadPoolExecutor(1) as pool:
            load = pool.submit(http.post, "/v1/adapters", json={"name": "alpha"}, timeout=30)
            time.sleep(0.5)  # the load is waiting for the core now
            assert not load.done()
            for model in ("beta", "alpha", "tiny-base"):
                assert _served_within(client, 1.0, model=model, prompt="Hello") == 200
            response = load.result()
        assert response.status_code == 503 and "did not load" in response.json()["error"]["message"]
        assert engine.alive and not engine._calls  # the timed-out call left no entry behind
        assert _served_within(client, 1.0, model="alpha", prompt="Hello") == 200  # rolled back, still served


def test_the_core_survives_a_bad_command_and_a_cancel_among_identical_requests(serve_lm, tmp_path):
    store = tmp_path / "store"
    for name in ("alpha",):
        write_random_adapter(store, name, serve_lm.loaded, tokens=4, seed=1)
    engine = EngineClient(EngineSpec(str(serve_lm.loaded.path), str(store), max_batch=1, threads=1))
    engine.start()
    try:
        engine._send(("no-such-command", 1, 2))  # logged and dropped by the core
        engine._send(("cancel",))  # malformed: the same
        finals = {}

        def sink(key):
            return lambda out: finals.setdefault(key, out) if out.finish_reason else None

        ids = serve_lm.tokenizer("Same prompt").input_ids
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        engine.submit(Request(list(ids), None, params, sink("busy"), request_id="busy"))  # holds the only row
        engine.submit(Request(list(ids), "alpha", SamplingParams(max_new_tokens=3), sink("a"), request_id="a"))
        engine.adapter_changed("load", "alpha")  # the core reloads it: the next request gets another tensor
        engine.submit(Request(list(ids), "alpha", SamplingParams(max_new_tokens=3), sink("b"), request_id="b"))
        assert engine.cancel("b")
        wait_for(lambda: len(finals) == 3, timeout=60, what="every request's final output")
        assert finals["b"].finish_reason == "cancelled" and finals["a"].finish_reason in ("length", "stop")
        assert engine.alive and engine.process.is_alive()
    finally:
        engine.shutdown(timeout=5)
