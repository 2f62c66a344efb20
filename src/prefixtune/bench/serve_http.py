"""`prefixtune bench serve --http`: the real server in its own process, loaded over HTTP by this process.

Every figure is a ratio against a baseline measured in the same run:
  - mixed traffic over 6 adapters vs base-model-only traffic (the ceiling: same engine, no prefixes) at
    concurrency 1/8/32: generated tokens/s, p50/p95 time to first token and latency, errors;
  - requests/s at max_tokens=1 with 500 adapters in the store vs 6 (same traffic);
  - a concurrent request with 4 stop strings of 20 KB (refused: 400) and one with 4 of the largest allowed
    size: the latency cost to a normal request beside it;
  - the server over HTTP at batch 16 vs a bare `transformers` greedy loop at batch 16 (the floor), with the model
    in an engine process (the default) and in the server's own process;
  - with --peft, PEFT's set_adapter + generate per adapter group (in process) vs our mixed traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from prefixtune.bench.serve_speed import write_random_adapters


@dataclass
class LoadResult:
    scenario: str
    concurrency: int
    requests: int
    errors: int  # non-2xx answers (4xx refusals of hostile requests are counted by the caller)
    seconds: float
    tokens: int  # completion tokens (from usage)
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    server_cpu_s: float = 0.0  # CPU seconds the server process burned (all threads): stable on a busy machine

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / max(self.seconds, 1e-9)

    def row(self) -> dict:
        return asdict(self) | {"tokens_per_s": round(self.tokens_per_s, 1),
                               "requests_per_s": round(self.requests_per_s, 2)}


class ServerProcess:
    """`prefixtune serve` in a child process on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model: str, store: Path, *flags: str, timeout: float = 180.0):
        env = {**os.environ, "PREFIXTUNE_THREADS": os.environ.get("PREFIXTUNE_THREADS", "1")}
        cmd = [sys.executable, "-m", "prefixtune", "serve", "--model", model, "--store", str(store), "--port", "0",
               *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.url = self._wait_for_url(timeout)

    def _wait_for_url(self, timeout: float) -> str:
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("prefixtune serve: http"):
                    found.append(line.split(": ", 1)[1].strip().removesuffix("/v1"))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        if not found:
            self.stop()
            raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
        return found[0]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and its child processes (its engine) so far (Linux; 0 elsewhere)."""
        return _tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _tree_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except (OSError, ValueError):  # a kernel without /proc/PID/task/TID/children: the server's own time only
        children = []
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_tree_cpu_seconds(child) for child in children)


async def _one(client: httpx.AsyncClient, body: dict) -> tuple[int, float, float, int]:
    """(status, ttft s, latency s, completion tokens) of one streamed completion."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                               "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0.0, time.perf_counter() - start, 0
        async for line in r.aiter_lines():
            # Parse only what is measured: the load generator shares the CPU with the server.
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - start
            if line.startswith("data: {") and '"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return 200, ttft if ttft is not None else latency, latency, tokens


async def _load(url: str, bodies: list[dict], concurrency: int) -> list[tuple[int, float, float, int]]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def run(body: dict):
            async with gate:
                return await _one(client, body)

        return await asyncio.gather(*(run(b) for b in bodies))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


def load(url: str | ServerProcess, scenario: str, bodies: list[dict], concurrency: int) -> LoadResult:
    server = url if isinstance(url, ServerProcess) else None
    cpu = server.cpu_seconds() if server else 0.0
    start = time.perf_counter()
    results = asyncio.run(_load(server.url if server else url, bodies, concurrency))
    seconds = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu if server else 0.0
    ok = [r for r in results if r[0] == 200]
    return LoadResult(scenario, concurrency, len(results), len(results) - len(ok), seconds, sum(r[3] for r in ok),
                      _pct([r[1] for r in ok], 0.5), _pct([r[1] for r in ok], 0.95),
                      _pct([r[2] for r in ok], 0.5), _pct([r[2] for r in ok], 0.95), cpu)


def _bodies(models: list[str], count: int, max_tokens: int, **extra) -> list[dict]:
    prompts = ["Text:", "Text: i feel", "Text: today", "Text: my friend"]
    return [{"model": models[i % len(models)], "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True, **extra} for i in range(count)]


def _tiny_model_dir(scratch: Path) -> str:
    from prefixtune.testing import save_tiny_model

    return str(save_tiny_model(scratch / "tiny-llama", arch="llama", seed=0))


def best(results: list[LoadResult]) -> LoadResult:
    """The run least disturbed by other jobs on the machine (noise only ever makes a run slower)."""
    return max(results, key=lambda r: (r.errors == 0, r.tokens_per_s if r.tokens else r.requests_per_s))


def run_http(model: str = "smollm2-135m", tiny: bool = False, concurrencies: tuple[int, ...] = (1, 8, 32),
             requests: int = 32, max_tokens: int = 16, many: int = 500, repeats: int = 2, peft: bool = False,
             say=print) -> dict:
    """Each scenario runs `repeats` times, alternating with its baseline; the best of each is compared."""
    scratch = Path(tempfile.mkdtemp(prefix="prefixtune-bench-serve-"))  # removed at the end, whatever happens
    try:
        return _run_http(scratch, model, tiny, concurrencies, requests, max_tokens, many, repeats, peft, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_http(scratch: Path, model: str, tiny: bool, concurrencies: tuple[int, ...], requests: int,
              max_tokens: int, many: int, repeats: int, peft: bool, say) -> dict:
    from prefixtune.bench import engine_overhead
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model

    model = _tiny_model_dir(scratch) if tiny else model
    loaded = load_base_model(model)
    root6, root_many = scratch / "store-6", scratch / f"store-{many}"
    names = write_random_adapters(loaded, root6, 6, tokens=10)
    write_random_adapters(loaded, root_many, many, tokens=10)  # bench-0..bench-5 are the same names
    report: dict = {"model": loaded.name, "runs": []}
    flags = ("--max-batch", str(max(concurrencies)), "--max-queue", "1024", "--served-model-name", "base")
    with ServerProcess(model, root_many, *flags) as server, ServerProcess(model, root6, *flags) as six:
        for url in (server.url, six.url):
            load(url, "warm-up", _bodies(names + ["base"], 8, 2), 8)
        ratios = {}
        for c in concurrencies:
            count = max(requests, 2 * c)
            runs = {"mixed 6 adapters": [], "base only": []}
            for _ in range(repeats):
                for scenario, models in (("mixed 6 adapters", names), ("base only", ["base"])):
                    runs[scenario].append(load(server.url, scenario, _bodies(models, count, max_tokens), c))
            for scenario, results in runs.items():
                r = best(results)
                report["runs"].append(r.row())
                say(f"{scenario:>16} c={c:<3} {r.tokens_per_s:7.1f} tok/s  ttft p50/p95 "
                    f"{r.ttft_p50_ms:.0f}/{r.ttft_p95_ms:.0f} ms  latency p50/p95 "
                    f"{r.latency_p50_ms:.0f}/{r.latency_p95_ms:.0f} ms  errors {sum(x.errors for x in results)}")
            ratios[c] = best(runs["mixed 6 adapters"]).tokens_per_s / max(best(runs["base only"]).tokens_per_s, 1e-9)
        report["mixed / base"] = {c: round(v, 3) for c, v in ratios.items()}
        say(f"mixed 6 adapters / base only: {report['mixed / base']}")
        report["stop strings"] = _stop_string_cost(server.url, names, say, repeats, max_tokens)
        report["max_tokens=1 requests/s"] = _store_size_cost(server, six, names, many, 2 * requests, repeats, say)
        if tiny:
            # The default server (model in an engine process) and the single-process one, in the same run.
            with ServerProcess(model, root6, *flags, "--no-engine-process") as single:
                servers = {"engine process": six, "single process": single}
                # A run is ~1 s each side and this VM's speed swings by 30% between seconds: more alternations.
                report["engine over HTTP vs bare loop"] = _engine_vs_bare_over_http(servers, loaded, say,
                                                                                    3 * (repeats + 1),
                                                                                    new_tokens=4 * max_tokens)
    report["engine vs bare loop"] = engine_overhead.run(PrefixLM(loaded, root6), new_tokens=4 * max_tokens,
                                                        repeats=repeats + 1, say=say)
    if peft:
        from prefixtune.bench.serve_speed import peft_grouped_tokens_per_s

        prompts = [b["prompt"] for b in _bodies(names, 24, max_tokens)]
        rows = [names[i % 6] for i in range(24)]
        report["peft grouped tokens/s"] = peft_grouped_tokens_per_s(loaded, root6, names, prompts, rows, max_tokens)
        mixed = {r["concurrency"]: r["tokens_per_s"] for r in report["runs"] if r["scenario"] == "mixed 6 adapters"}
        report["mixed / peft"] = max(mixed.values()) / max(report["peft grouped tokens/s"], 1e-9)
        say(f"PEFT set_adapter + generate per adapter group: {report['peft grouped tokens/s']:.1f} tok/s; "
            f"mixed over HTTP = {report['mixed / peft']:.2f}x")
    return report


def _store_size_cost(server: ServerProcess, six: ServerProcess, names: list[str], many: int, count: int,
                     repeats: int, say) -> dict[str, float]:
    """Requests/s at max_tokens=1 (admission, adapter lookup, one step) with `many` adapters in the store against
    6, and with the traffic spread over all `many`."""
    rps = {"6 in store": [], f"{many} in store": [], f"spread over {many}": []}
    spread = [f"bench-{i}" for i in range(many)]
    for _ in range(repeats):
        rps["6 in store"].append(load(six.url, "6 in store", _bodies(names, count, 1), 8))
        rps[f"{many} in store"].append(load(server.url, f"{many} in store", _bodies(names, count, 1), 8))
        rps[f"spread over {many}"].append(load(server.url, "spread", _bodies(spread, count, 1), 8))
    rps = {k: best(v).requests_per_s for k, v in rps.items()}
    rps["ratio"] = rps[f"{many} in store"] / max(rps["6 in store"], 1e-9)
    say(f"max_tokens=1: {rps[f'{many} in store']:.1f} req/s with {many} adapters in the store vs "
        f"{rps['6 in store']:.1f} with 6 = {rps['ratio']:.2f}x (traffic spread over all {many}: "
        f"{rps[f'spread over {many}']:.1f} req/s)")
    return rps


def _stop_string_cost(url: str, names: list[str], say, repeats: int = 2, max_tokens: int = 16) -> dict:
    """Normal requests' latency beside 4 long requests with no stop strings, with 4 x 20 KB stop strings (refused),
    and with 4 stop strings of the largest allowed length: the ratio isolates what stop strings cost others."""
    normal = _bodies(names, 12, max_tokens)

    async def beside(stops: list[str] | None) -> tuple[list[int], float]:
        hostile = _bodies(names, 4, 4 * max_tokens, **({"stop": stops} if stops else {}))
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=32)) as client:
            bad = asyncio.gather(*(_one(client, b) for b in hostile))
            good = asyncio.gather(*(_one(client, b) for b in normal))
            bad, good = await bad, await good
        return sorted({r[0] for r in bad}), statistics.median(r[2] for r in good) * 1000

    plain, huge, allowed = [], [], []
    for _ in range(repeats):  # alternating, best (lowest) latency of each
        plain.append(asyncio.run(beside(None))[1])
        huge_status, latency = asyncio.run(beside(["\u00e9" * 20_000 + str(i) for i in range(4)]))
        huge.append(latency)
        allowed_status, latency = asyncio.run(beside(["\u00e9" * 255 + str(i) for i in range(4)]))
        allowed.append(latency)
    plain, huge, allowed = min(plain), min(huge), min(allowed)
    cost = {"4x20KB status": huge_status, "4x256 status": allowed_status, "normal p50 ms beside plain": plain,
            "normal p50 ms beside 4x20KB": huge, "normal p50 ms beside 4x256": allowed,
            "cost of 4x256 stops to others": allowed / max(plain, 1e-9) - 1}
    say(f"4 stop strings of 20 KB: HTTP {huge_status}; normal requests' p50 latency beside 4 long requests: "
        f"{plain:.0f} ms (no stops), {allowed:.0f} ms (4 stops of 256 chars) = "
        f"{100 * cost['cost of 4x256 stops to others']:+.1f}%")
    return cost


def _engine_vs_bare_over_http(servers: dict[str, ServerProcess], loaded, say, repeats: int = 3, batch: int = 16,
                              new_tokens: int = 64) -> dict:
    """Each server at batch 16 (streamed and not) against the bare loop, best of alternating runs.

    Fair to the loop: it runs at the server's torch threads (the load generator needs the other cores), and the
    clients hold warm keep-alive connections, as a deployment's clients do, so a run measures serving, not TCP
    handshakes. Wall-clock tokens/s (what a client sees) and tokens per CPU second (what the server burns, every
    thread and its engine process included) against the loop's.
    """
    import torch

    from prefixtune.bench.engine_overhead import bare_loop_tokens_per_s

    prompt = loaded.tokenizer("Once upon a time there was").input_ids
    body = {"model": "base", "prompt": list(prompt), "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    threads = int(os.environ.get("PREFIXTUNE_THREADS", "1"))  # ServerProcess's default
    best_of: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best_of[key] = max(best_of.get(key, 0.0), value)

    async def plain(client: httpx.AsyncClient) -> int:
        answers = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(batch)))
        return sum(a.json()["usage"]["completion_tokens"] for a in answers)

    async def streamed(client: httpx.AsyncClient) -> int:
        return sum(r[3] for r in await asyncio.gather(*(_one(client, body) for _ in range(batch))))

    async def measure() -> None:
        limits = httpx.Limits(max_connections=batch + 4, max_keepalive_connections=batch + 4)
        clients = {name: httpx.AsyncClient(base_url=s.url, timeout=600, limits=limits) for name, s in servers.items()}
        try:
            for client in clients.values():  # open the connections before anything is timed
                await asyncio.gather(*(client.post("/v1/completions", json={**body, "max_tokens": 2})
                                       for _ in range(batch)))
            for _ in range(repeats):  # alternating, so a burst of load elsewhere hits every side alike
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    cpu = time.process_time()
                    keep("bare", bare_loop_tokens_per_s(loaded.model, prompt, batch, new_tokens))
                    keep("bare per CPU s", batch * new_tokens / max(time.process_time() - cpu, 1e-9))
                finally:
                    torch.set_num_threads(previous)
                for name, client in clients.items():
                    for how, run in (("streamed", streamed), ("not streamed", plain)):
                        cpu, start = servers[name].cpu_seconds(), time.perf_counter()
                        tokens = await run(client)
                        seconds, cpu = time.perf_counter() - start, servers[name].cpu_seconds() - cpu
                        keep(f"{name} {how}", tokens / seconds)
                        keep(f"{name} {how} per CPU s", tokens / max(cpu, 1e-9))
        finally:
            for client in clients.values():
                await client.aclose()

    asyncio.run(measure())
    return _against_bare(best_of, list(servers), threads, batch, say)


def _against_bare(best_of: dict[str, float], servers: list[str], threads: int, batch: int, say) -> dict:
    """Each server's best tokens/s, wall clock and per CPU second, and its ratio to the bare loop's."""
    report = {"bare loop tokens/s": best_of["bare"], "bare tokens per CPU s": best_of["bare per CPU s"],
              "torch threads": threads}
    for name in servers:
        for how in ("streamed", "not streamed"):
            ours, cpu = best_of[f"{name} {how}"], best_of[f"{name} {how} per CPU s"]
            report[f"{name} {how} tokens/s"], report[f"{name} {how} tokens per CPU s"] = ours, cpu
            report[f"{name} {how} / bare"] = ours / best_of["bare"]
            report[f"{name} {how} / bare (CPU)"] = cpu / best_of["bare per CPU s"]
            say(f"tiny model over HTTP, batch {batch}, {name}, {how}: {ours:.0f} tok/s vs bare transformers loop "
                f"{best_of['bare']:.0f} ({threads} thread(s) each) = {ours / best_of['bare']:.2f}x wall clock; "
                f"per CPU second {cpu / best_of['bare per CPU s']:.2f}x")
    report["engine / bare"] = report[f"{servers[0]} streamed / bare"]  # the server as users run it, streaming
    return report
