"""Soak: concurrent clients over mixed adapters, some streaming and hanging up mid-stream, some guided, some with
stop strings. Zero 5xx, every slot freed, threads and memory bounded. Short by default; set
PREFIXTUNE_SOAK_S=300 for a longer run."""

from __future__ import annotations

import os
import random
import threading
import time

import httpx
from serve_helpers import live_server, wait_for

SECONDS = float(os.environ.get("PREFIXTUNE_SOAK_S", "0"))  # 0: a fixed small number of requests instead
REQUESTS_PER_CLIENT = 6
CLIENTS = 6


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _client(root: str, seed: int, statuses: list, stop_at: float) -> None:
    rnd = random.Random(seed)
    with httpx.Client(base_url=root, timeout=60) as http:
        done = 0
        while (time.monotonic() < stop_at) if SECONDS else done < REQUESTS_PER_CLIENT:
            done += 1
            model = rnd.choice(["alpha", "beta", "tiny-base"])
            body = {"model": model, "prompt": rnd.choice(["Tell me", "The weather was", "x"]),
                    "max_tokens": rnd.randint(1, 12), "temperature": rnd.choice([0, 0.8]), "seed": rnd.randint(0, 9),
                    "stop": rnd.choice([None, ["e"], ["\n", "zz"]])}
            if model != "tiny-base" and rnd.random() < 0.25:
                body["guidance_scale"] = 2.0
            if rnd.random() < 0.5:
                body["stream"] = True
                with http.stream("POST", "/v1/completions", json=body) as r:
                    statuses.append(r.status_code)
                    for i, _ in enumerate(r.iter_lines()):
                        if rnd.random() < 0.3 and i >= 1:
                            break  # hang up mid-stream: the server must free the row
            else:
                statuses.append(http.post("/v1/completions", json=body).status_code)


def test_soak_mixed_clients_with_disconnects(serve_lm):
    with live_server(serve_lm, max_batch=6, max_model_len=128) as srv:
        before, rss_before = {t.ident for t in threading.enumerate()}, _rss_mb()
        statuses: list[int] = []
        stop_at = time.monotonic() + SECONDS
        clients = [threading.Thread(target=_client, args=(srv.root, i, statuses, stop_at)) for i in range(CLIENTS)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(600)
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
        wait_for(lambda: srv.scheduler.in_flight == 0 and srv.scheduler.running == 0, 30, "every slot freed")
        assert srv.scheduler.error is None
        # New threads may only be pooled workers (anyio's thread pool has a fixed limit, the tokenizer and the
        # runner's prefill one thread each):
        # nothing is started per request or per stream.
        new = [t.name for t in threading.enumerate() if t.ident not in before]
        assert all(n.startswith(("AnyIO worker", "prefixtune-tokenize", "prefixtune-prefill")) for n in new), new
        assert len(new) <= 41, new
        assert _rss_mb() - rss_before < 300, "memory grew during the soak"
        finished = srv.scheduler.stats.finished
        assert finished["error"] == 0 and sum(finished.values()) == len(statuses)
