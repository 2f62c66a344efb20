"""A supervised engine process (engine/supervisor.py): a core killed with SIGKILL mid-stream fails its requests at
once, the server answers 503 + Retry-After while a new core starts, adapters loaded by path are loaded again, and
serving goes on; past the restart budget the server stops, so its process can exit non-zero."""

from __future__ import annotations

import threading
import time

import openai
from serve_helpers import counters, live_server, wait_for

from prefixtune.testing import write_random_adapter


def _plain_request(http, results: list) -> None:
    response = http.post("/v1/completions", json={"model": "alpha", "prompt": "Plain", "max_tokens": 200,
                                                   "temperature": 0, "ignore_eos": True}, timeout=60)
    results.append(response)


def _stream_until_error(client, results: list, started: threading.Event, index: int) -> None:
    try:
        stream = client.completions.create(model="alpha", prompt=f"Stream {index}", max_tokens=200, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        for n, _ in enumerate(stream):
            if n == 0:
                started.set()
        results[index] = "finished"
    except openai.APIError as err:
        results[index] = f"error: {err}"


def test_a_killed_core_fails_its_streams_restarts_and_serves_again(serve_lm, tmp_path):
    roots = tmp_path / "roots"
    folder = write_random_adapter(roots, "gamma", serve_lm.loaded, tokens=5, seed=3, scale=10.0)
    # 9 rows: the 8 streams and the plain request all run when the core is killed (none waits for a row).
    with live_server(serve_lm, engine_process=True, supervised=2, max_batch=9, max_model_len=256,
                     adapter_roots=[roots]) as srv:
        client = srv.client()
        with srv.http() as http:
            assert http.post("/v1/adapters", json={"name": "gamma", "path": str(folder)}).status_code == 200
        gamma = client.completions.create(model="gamma", prompt="Hello", max_tokens=8, temperature=0).choices[0].text
        results, started = [None] * 8, [threading.Event() for _ in range(8)]
        threads = [threading.Thread(target=_stream_until_error, args=(client, results, started[i], i))
                   for i in range(8)]
        plain: list = []
        with srv.http() as plain_http:
            threads.append(threading.Thread(target=_plain_request, args=(plain_http, plain)))
            for t in threads:
                t.start()
            assert all(e.wait(30) for e in started), f"the streams did not start: {results}"
            killed = time.monotonic()
            srv.scheduler.client.process.kill()
            for t in threads:
                t.join(10)
        assert all(r is not None and r.startswith("error") for r in results), results  # none hangs, none "finished"
        # A plain request in flight: the process died, not the request, so a retry will pass (503, not 500).
        assert len(plain) == 1 and plain[0].status_code == 503, plain and plain[0].text
        assert plain[0].headers["Retry-After"] == "5" and plain[0].json()["error"]["code"] == "engine_restarting"
        with srv.http() as http:
            dead = counters(http.get("/metrics").text)  # the dead core's last report
            health = http.get("/health")
            if health.status_code == 503:  # restarting: refused with a hint when to come back
                assert health.json()["status"] == "restarting" and health.headers["Retry-After"] == "5"
                refused = http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers.get("Retry-After") == "5"
                assert refused.json()["error"]["code"] == "engine_restarting"
            wait_for(lambda: http.get("/health").status_code == 200, timeout=60, what="the restarted engine")
            back = time.monotonic() - killed
            assert http.get("/health").json()["engine_restarts"] == 1
            assert "prefixtune_engine_restarts_total 1.0" in http.get("/metrics").text
        assert back < 30, f"serving again after {back:.1f} s"
        again = client.completions.create(model="gamma", prompt="Hello", max_tokens=8, temperature=0)
        assert again.choices[0].text == gamma  # the by-path adapter was loaded into the new core
        count = client.completions.create(model="alpha", prompt="Count", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
        with srv.http() as http:
            now = counters(http.get("/metrics").text)
        # Prometheus counters never go back: the new core's counts are added to the dead one's totals.
        assert all(now[key] >= dead[key] for key in dead), (dead, now)
        generated, steps = ("prefixtune_generated_tokens_total", ()), ("prefixtune_decode_steps_total", ())
        assert dead[generated] > 0 and dead[steps] > 0, dead
        assert now[generated] == dead[generated] + again.usage.completion_tokens + count.usage.completion_tokens
        assert now[steps] >= dead[steps] + 4  # the 5-token request alone took a prefill and 4 decode steps


def test_past_the_restart_budget_the_server_stops(serve_lm):
    with live_server(serve_lm, engine_process=True, supervised=0, max_batch=2, max_model_len=128) as srv:
        srv.scheduler.client.process.kill()
        wait_for(lambda: srv.scheduler.failed, timeout=30, what="supervision giving up")
        assert "1 engine failures" in srv.scheduler.reason
        srv.thread.join(15)  # uvicorn's tick sees the failed engine and stops by itself
        assert not srv.thread.is_alive()
