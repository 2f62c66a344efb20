"""`serve --backend ray`: a local Ray cluster, 2 CPU replicas of the tiny model, K=2 adapters per replica,
the real `openai` client against the Serve HTTP ingress, compared with the single-process server.

One cluster for the module; the tests run in order (the first fills both replicas, the third evicts, the last
kills a replica)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import API_KEY, counters, live_server, wait_for, write_adapter

pytest.importorskip("ray.serve")
# Starting Ray, Serve and 2 replicas took 120-160 s here (2 cores, load 7-8); the tests themselves ~20 s, plus
# 20-40 s while the kill test waits for the replacement replica.
pytestmark = pytest.mark.slow

NAMES = ["r1", "r2", "r3", "r4", "r5"]  # four fill both replicas (K=2 each), the fifth must evict
PINNED = "p0"  # held by every replica outside the LRU
PRELOADED = "r1"  # every replica loads it at start, into its LRU
PROMPT = "I feel so happy today because"
LONG = 200  # tokens of the in-flight streams (tiny model: 256 positions)
COMPOSED = [f"{PINNED}+{PRELOADED}", "r2+r3"]  # composed models, asked for after the placement tests


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory, serve_base) -> Path:
    root = tmp_path_factory.mktemp("ray-store")
    for i, name in enumerate([*NAMES, PINNED]):
        write_adapter(root / name, serve_base, name, 4 + i % 3, seed=300 + i)
    return root


def _best_of(client) -> list[str]:
    """A composed model's best 2 of 3 seeded samples (ranked by evidence on the replica, the score crossing Ray)."""
    r = client.completions.create(model=COMPOSED[1], prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, n=2,
                                  best_of=3, extra_body={"ignore_eos": True})
    return [c.text for c in r.choices]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, ray_store):
    """Greedy texts of the single-process server for every adapter and the base model (short and long)."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model

    lm = PrefixLM(load_base_model(str(tiny_model_dir), device="cpu", dtype="float32"), ray_store)
    out = {}
    with live_server(lm) as srv:
        client = srv.client()
        # Composed models ("a+b") run as a product of experts, the default composition.
        asked = [(m, n) for m in [*NAMES, PINNED, "tiny-base"] for n in (12, LONG)] + [(m, 12) for m in COMPOSED]
        for model, n in asked:
            r = client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0,
                                          extra_body={"ignore_eos": True})
            out[model, n] = r.choices[0].text
        out["best_of"] = _best_of(client)
    assert len({out[m, 12] for m in [*NAMES, PINNED, "tiny-base", *COMPOSED]}) == 9, "each model changes the output"
    return out


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, ray_store):
    import ray
    from ray import serve

    from prefixtune.server.app import ServerSettings
    from prefixtune.server.ray_backend import RayOptions, board_name, connect, deploy, undeploy
    from prefixtune.server.ray_replica import ReplicaConfig

    opts = RayOptions(replicas=2, replica_cpus=0.1, local_cpus=2)
    cfg = ReplicaConfig(model=str(tiny_model_dir), store=str(ray_store), board=board_name(opts), device="cpu",
                        dtype="float32", max_batch=8, max_adapters=2, pin=[PINNED], preload=[PRELOADED])
    connect(opts)
    try:
        url = deploy(cfg, ServerSettings(model_name="tiny-base", port=0, api_key=API_KEY), opts)
        yield url
        undeploy(opts)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster, api_key=API_KEY, max_retries=0, timeout=60)


def placement(url: str) -> list[dict]:
    r = httpx.get(url + "/adapters/placement", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    r.raise_for_status()
    return r.json()["replicas"]


def holders(url: str, name: str) -> list[str]:
    return [r["id"] for r in placement(url) if name in r["adapters"]]


def complete(client, model: str, n: int = 12, stream: bool = False) -> str:
    kw = dict(model=model, prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    return client.completions.create(**kw).choices[0].text


def test_outputs_equal_the_single_process_server_and_fill_both_replicas(cluster, client, reference):
    assert {m.id for m in client.models.list().data} == {"tiny-base", *NAMES, PINNED}
    assert [r["adapters"] for r in placement(cluster)] == [[PRELOADED]] * 2  # before any request
    for name in NAMES[:4]:  # one at a time: a new adapter goes to a replica holding fewest (K=2: 4 fill both)
        assert complete(client, name) == reference[name, 12], name
        wait_for(lambda: holders(cluster, name), 10, f"{name} placed")
        time.sleep(0.5)  # Serve's router learns the new placement (pushed every 0.1 s)
    assert complete(client, "tiny-base", stream=True) == reference["tiny-base", 12]
    assert complete(client, PINNED) == reference[PINNED, 12]
    assert complete(client, "r2", stream=True) == reference["r2", 12]
    replicas = placement(cluster)
    assert len(replicas) == 2
    assert sorted(len(r["adapters"]) for r in replicas) == [2, 2], replicas
    assert all(r["pinned"] == [PINNED] and PINNED not in r["adapters"] for r in replicas), replicas
    with pytest.raises(openai.NotFoundError):
        complete(client, "nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster, api_key="wrong", max_retries=0).models.list()


def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(cluster, client, reference):
    before = {r["id"]: r["requests"] for r in placement(cluster)}
    for name in NAMES[:4]:
        held_by = holders(cluster, name)
        assert held_by, f"{name} is held nowhere: {placement(cluster)}"
        for _ in range(3):
            assert complete(client, name) == reference[name, 12]
        # Replicas report to the placement board every REPORT_S, so the last request's count may lag a little.
        counts = lambda: {r["id"]: r["requests"] for r in placement(cluster)}  # noqa: E731
        gain = lambda after: {rid: after[rid].get(name, 0) - before[rid].get(name, 0) for rid in after}  # noqa: E731
        wait_for(lambda: sum(gain(counts()).values()) >= 3, 10, f"3 requests for {name} on the board")
        after = counts()
        gained = gain(after)
        assert sum(gained.values()) == 3 and all(gained[rid] == 0 for rid in after if rid not in held_by), \
            (name, held_by, after)
        assert holders(cluster, name) == held_by, "serving it must not load it anywhere else"
        before = after


def test_a_third_adapter_evicts_one_without_breaking_in_flight_rows(cluster, client, reference):
    held = {r["id"]: list(r["adapters"]) for r in placement(cluster)}
    mixed = {r["id"]: r["mixed_steps"] for r in placement(cluster)}
    evictions = sum(r["evictions"] for r in placement(cluster))
    assert all(len(a) == 2 for a in held.values()), held
    texts, done_at = {}, {}

    def stream(name: str) -> None:
        texts[name] = complete(client, name, LONG, stream=True)
        done_at[name] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(n,)) for a in held.values() for n in a]
    for t in threads:
        t.start()
    wait_for(lambda: all(r["running"] == 2 for r in placement(cluster)), 30, "two rows running on each replica")
    assert complete(client, "r5") == reference["r5", 12]  # K=2 everywhere: it evicts on the replica it lands on
    evicted_at = time.monotonic()
    for t in threads:
        t.join(60)
    assert all(done_at[n] > evicted_at for n in done_at), "the long rows must still run at the eviction"
    for name, text in texts.items():
        assert text == reference[name, LONG], f"{name}'s in-flight row changed by the eviction"
    after = placement(cluster)
    assert sum(r["evictions"] for r in after) == evictions + 1
    (lands,) = [r for r in after if "r5" in r["adapters"]]
    assert len(lands["adapters"]) == 2 and set(lands["adapters"]) < set(held[lands["id"]]) | {"r5"}
    # Each replica ran its two adapters' rows together: one decode step mixed both.
    assert all(r["mixed_steps"] > mixed[r["id"]] for r in after), after


GENERATED = ("prefixtune_generated_tokens_total", ())


def engine_counters(url: str) -> dict[tuple, float]:
    return counters(httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30,
                              headers={"Authorization": f"Bearer {API_KEY}"}).text)


def exclusive(url: str) -> dict[str, list[str]]:
    """Replica id -> the adapters that replica alone holds (their requests can only land there)."""
    replicas = placement(url)
    return {r["id"]: [a for a in r["adapters"] if all(a not in o["adapters"] for o in replicas if o is not r)]
            for r in replicas}


def read_stream(url: str, model: str, n: int, into: dict) -> None:
    """A streamed completion read as raw server-sent events: into["events"] (parsed), ["first"], ["end"]."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    into["events"] = []
    with httpx.stream("POST", url + "/completions", json=body, timeout=90,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                into["events"].append(data if data == "[DONE]" else json.loads(data))
                into.setdefault("first", time.monotonic())
    into["end"] = time.monotonic()


def post_completion(url: str, model: str, n: int, into: dict) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    into["response"] = httpx.post(url + "/completions", json=body, timeout=90,
                                  headers={"Authorization": f"Bearer {API_KEY}"})
    into["end"] = time.monotonic()


def split_replicas(url: str, client) -> tuple[str, list[str], str, list[str]]:
    """(victim, its own adapters, survivor, its own adapters), placing adapters until each replica has one."""
    for name in NAMES:  # placed one at a time, as above: a new adapter goes to the replica holding fewest
        if all(exclusive(url).values()):
            break
        if not holders(url, name):
            complete(client, name)
            wait_for(lambda: holders(url, name), 10, f"{name} placed")  # noqa: B023
            time.sleep(0.5)
    only = exclusive(url)
    assert len(only) == 2 and all(only.values()), placement(url)
    (victim, doomed), (survivor, spared) = sorted(only.items())
    return victim, doomed, survivor, spared


def assert_lost(results: dict) -> None:
    """The killed replica's streams ended with an error event then [DONE]; its plain request got a 503."""
    for key in ("v0", "v1"):
        events = results[key]["events"]
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert events[-2]["error"]["code"] == "replica_lost" and "retry" in events[-2]["error"]["message"], events
        assert all("error" not in e for e in events[:-2]), events
    plain = results["v_plain"]["response"]
    assert plain.status_code == 503 and plain.headers.get("Retry-After"), (plain.status_code, plain.text)
    assert plain.json()["error"]["code"] == "replica_lost", plain.text


def served_within_retries(client, name: str, expected: str) -> int:
    """Attempts until a request for `name` was served (a 503 replica_lost tells the client to retry)."""
    for attempt in (1, 2, 3):
        try:
            assert complete(client, name) == expected
            return attempt
        except openai.APIStatusError as err:
            assert err.status_code == 503 and err.body["code"] == "replica_lost" and attempt < 3, err
            time.sleep(1)
    raise AssertionError("unreachable")


def test_a_replica_killed_mid_stream_fails_only_its_requests_and_is_replaced(cluster, client, reference):
    victim, doomed, survivor, spared = split_replicas(cluster, client)
    pid = {r["id"]: r["pid"] for r in placement(cluster)}[victim]
    results = {key: {} for key in ("v0", "v1", "v_plain", "s0", "s1")}
    jobs = [(read_stream, doomed[0], "v0"), (read_stream, doomed[-1], "v1"), (post_completion, doomed[0], "v_plain"),
            (read_stream, spared[0], "s0"), (read_stream, spared[-1], "s1")]
    threads = [threading.Thread(target=fn, args=(cluster, name, LONG, results[key])) for fn, name, key in jobs]
    for t in threads:
        t.start()
    running = lambda: {r["id"]: r["running"] for r in placement(cluster)}  # noqa: E731
    wait_for(lambda: all("first" in results[k] for k in ("v0", "v1", "s0", "s1"))
             and running() == {victim: 3, survivor: 2}, 30, "3 rows running on the victim, 2 on the other")
    before = engine_counters(cluster)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for t in threads[:3]:
        t.join(60)
    assert not any(t.is_alive() for t in threads[:3]), f"a request hangs after the kill: {results}"
    assert_lost(results)
    errored = max(results[k]["end"] for k in ("v0", "v1", "v_plain")) - killed
    sent = time.monotonic()  # the killed replica's adapter at once: Serve routes it to the live replica
    attempts = served_within_retries(client, doomed[0], reference[doomed[0], 12])
    failover, failover_at = time.monotonic() - sent, sent - killed
    for t in threads[3:]:
        t.join(60)
    for key, name in (("s0", spared[0]), ("s1", spared[-1])):  # the other replica's streams finished intact
        events = results[key]["events"]
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events[-3:]
        assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == reference[name, LONG], name
        assert results[key]["end"] > killed, "the other replica's stream must still run at the kill"
    # Serve starts a replacement; the dead replica drops off the placement board (it stops reporting).
    wait_for(lambda: len(ids := {r["id"] for r in placement(cluster)}) == 2 and victim not in ids, 180,
             "a replacement replica on the placement board")
    replaced = time.monotonic() - killed
    (new,) = [r for r in placement(cluster) if r["id"] != survivor]
    assert new["pid"] != pid and new["running"] == 0 and new["pinned"] == [PINNED], new
    for name in doomed:  # the killed replica's adapters are served again, by whichever replica Serve picks
        assert complete(client, name) == reference[name, 12], name
        wait_for(lambda: holders(cluster, name), 10, f"{name} placed again")  # noqa: B023
    # The killed replica's counts stay in /metrics: counters go on from there with every token served since.
    gained = 12 * (1 + len(doomed))
    wait_for(lambda: engine_counters(cluster)[GENERATED] >= before[GENERATED] + gained, 10, "generated tokens counted")
    after = engine_counters(cluster)
    assert all(after[key] >= value for key, value in before.items()), (before, after)
    print(f"\nreplica killed mid-stream: its requests ended {errored:.2f} s after the kill; a request for its "
          f"adapter sent {failover_at:.2f} s after it was served in {failover:.2f} s ({attempts} attempt(s)); a "
          f"replacement reported {replaced:.1f} s after it; adapters held by {[holders(cluster, n) for n in doomed]}"
          f" (new replica {new['id']}, survivor {survivor}); load average {os.getloadavg()[0]:.1f}")


def test_composed_models_run_as_experts_on_a_replica(cluster, client, reference):
    """Last: a composed request loads its parts into whichever replica Serve picks (placement is not checked)."""
    for model in COMPOSED:
        assert complete(client, model) == reference[model, 12], model
        assert complete(client, model, stream=True) == reference[model, 12], model
    assert _best_of(client) == reference["best_of"]
