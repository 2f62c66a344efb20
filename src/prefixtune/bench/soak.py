"""`prefixtune bench soak`: the real server under mixed traffic for M minutes, watched minute by minute.

A tiny random Llama (SmolLM2's tokenizer) served by `prefixtune serve` in its own process (engine process as by
default). Six clients loop over: plain and streamed completions over mixed adapters, streams hung up mid-way,
requests whose client gives up after 50 ms (the server must cancel them), guided and beam requests; an admin
thread unloads and loads adapters every 2 s; once a minute a burst of 96 concurrent requests overruns the
queue (429s expected). Reported per minute: requests by outcome, p50/p99 latency of the answered ones, and the
resident memory of the server and its engine process; at the end the server must drain to zero running rows
and zero queued requests.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from prefixtune.bench.serve_http import ServerProcess, _pct, _tiny_model_dir
from prefixtune.bench.serve_speed import write_random_adapters

CLIENTS = 6
PROMPTS = ["Tell me", "The weather was", "x", "Once upon a time there was a"]


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the engine process), in MB (Linux)."""
    total, pids = 0.0, [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
        for p in pids:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    except OSError:
        pass
    return total


def _body(rnd: random.Random, names: list[str]) -> dict:
    model = rnd.choice(names + ["base"])
    body = {"model": model, "prompt": rnd.choice(PROMPTS), "max_tokens": rnd.randint(1, 24),
            "temperature": rnd.choice([0, 0.8]), "seed": rnd.randint(0, 99)}
    kind = rnd.random()
    if model != "base" and kind < 0.15:
        body["guidance_scale"] = 2.0
    elif kind < 0.25:
        body.update(num_beams=2, temperature=0)
    return body


def _client(url: str, names: list[str], seed: int, deadline: float, log: list) -> None:
    rnd = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline:
            body, start, kind = _body(rnd, names), time.monotonic(), rnd.random()
            try:
                if kind < 0.1:  # the client gives up: the server must cancel the row
                    http.post("/v1/completions", json={**body, "max_tokens": 64}, timeout=0.05)
                    outcome = "completed"
                elif kind < 0.55 and "num_beams" not in body:
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        outcome = str(r.status_code)
                        for i, _ in enumerate(r.iter_lines()):
                            if kind < 0.25 and i >= 2:
                                outcome = "hung up"
                                break
                else:
                    outcome = str(http.post("/v1/completions", json=body).status_code)
            except httpx.TimeoutException:
                outcome = "gave up"
            log.append((start, outcome, time.monotonic() - start))


def _admin(url: str, names: list[str], deadline: float, log: list) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        i = 0
        while time.monotonic() < deadline:
            name = names[i % len(names)]
            for method, path, body in (("DELETE", f"/v1/adapters/{name}", None), ("POST", "/v1/adapters",
                                                                                    {"name": name})):
                start = time.monotonic()
                status = http.request(method, path, json=body).status_code
                log.append((start, f"admin {status}", time.monotonic() - start))
            i += 1
            time.sleep(2.0)


def _burst(url: str, names: list[str], log: list, size: int = 96) -> None:
    rnd = random.Random(7)

    def one() -> None:
        start = time.monotonic()
        with httpx.Client(base_url=url, timeout=60) as http:
            status = http.post("/v1/completions", json={**_body(rnd, names), "num_beams": 1}).status_code
        log.append((start, f"burst {status}", time.monotonic() - start))

    threads = [threading.Thread(target=one) for _ in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def _minutes(log: list, start: float, memory: list) -> list[dict]:
    rows = []
    for minute, rss in enumerate(memory):
        items = [x for x in log if minute * 60 <= x[0] - start < (minute + 1) * 60]
        answered = [lat for _, outcome, lat in items if outcome in ("200", "burst 200")]
        rows.append({"minute": minute + 1, "requests": len(items), "outcomes": dict(Counter(o for _, o, _ in items)),
                     "p50 ms": round(1000 * statistics.median(answered), 1) if answered else None,
                     "p99 ms": round(_pct(answered, 0.99), 1) if answered else None, "rss MB": round(rss, 1)})
    return rows


def run_soak(minutes: float, say=print) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="prefixtune-soak-"))
    model = _tiny_model_dir(scratch)
    from prefixtune.models import load_base_model

    names = write_random_adapters(load_base_model(model), scratch / "store", 4, tokens=6)
    flags = ("--max-batch", "8", "--max-queue", "48", "--served-model-name", "base", "--max-model-len", "256")
    log: list = []
    with ServerProcess(model, scratch / "store", *flags) as server:
        start = time.monotonic()
        deadline = start + 60 * minutes
        workers = [threading.Thread(target=_client, args=(server.url, names, i, deadline, log)) for i in range(CLIENTS)]
        workers.append(threading.Thread(target=_admin, args=(server.url, names[2:], deadline, log)))
        for w in workers:
            w.start()
        memory = []
        while time.monotonic() < deadline:
            _burst(server.url, names[:2], log)  # adapters the admin thread never unloads: 200 or 429 only
            time.sleep(max(0.0, min(deadline, start + 60 * (len(memory) + 1)) - time.monotonic()))
            memory.append(_rss_mb(server.proc.pid))
        for w in workers:
            w.join(120)
        drained = _drain(server.url)
    rows = _minutes(log, start, memory)
    outcomes = Counter(o for _, o, _ in log)
    growth = (memory[-1] / memory[0] - 1) if len(memory) > 1 else 0.0
    report = {"minutes": minutes, "requests": len(log), "outcomes": dict(outcomes), "per minute": rows,
              "5xx": sum(n for o, n in outcomes.items() if o.split()[-1].startswith("5")),
              "rss growth after minute 1": round(growth, 4), **drained}
    for row in rows:
        say(json.dumps(row))
    say(f"{len(log)} requests, {report['5xx']} 5xx; memory after minute 1 {100 * growth:+.1f}%; at the end "
        f"{drained['running']} running rows, {drained['waiting']} queued requests")
    return report


def _drain(url: str, timeout: float = 60.0) -> dict:
    """Wait until the server holds no row and no queued request (what a leak would prevent)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as http:
        while True:
            health = http.get("/health").json()
            if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
                return {"running": health["running"], "waiting": health["waiting"], "status": health["status"]}
            time.sleep(0.2)
