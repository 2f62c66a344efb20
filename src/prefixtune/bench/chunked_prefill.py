"""`prefixtune bench prefill`: what a long prompt joining a busy server costs the streams already running.

The real server in its own process, `streams` greedy streams decoding over HTTP; once every stream is going, one
prompt of `prompt_tokens` tokens joins. Per `--max-step-tokens` setting (0 = prompts join whole, the baseline),
all in the same run:
  - the running streams' median inter-token gap before the join, and the p99 / max gap while the long prompt
    is prefilled (from its submission to its first token): the stall the join inflicts;
  - the long prompt's time to first token (what chunking costs it), and the streams' tokens/s over the run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from prefixtune.bench.serve_http import ServerProcess, _pct, _tiny_model_dir

PROMPTS = ["Text: i feel", "Text: today", "Text: my friend", "Text: the weather"]


def _stream(url: str, prompt: str, max_tokens: int, arrivals: list[float], stop: threading.Event) -> None:
    body = {"model": "base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())


def _long_prompt(tokenizer, tokens: int) -> str:
    words = ("the quick brown fox jumps over a lazy dog while rain falls on quiet streets of an old town and "
             "people hurry home ").split()
    text, i = [], 0
    while len(tokenizer(" ".join(text)).input_ids) < tokens:
        text.extend(words[i % len(words)] for i in range(i, i + 50))
        i += 50
    ids = tokenizer(" ".join(text)).input_ids[:tokens]
    return tokenizer.decode(ids)


def measure(url: str, long_prompt: str, streams: int, max_tokens: int, warm_s: float) -> dict:
    """One join: the streams' gaps before and during it, the long prompt's time to first token."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    stop = threading.Event()
    threads = [threading.Thread(target=_stream, args=(url, PROMPTS[i % len(PROMPTS)], max_tokens, arrivals[i], stop),
                                daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(len(a) for a in arrivals) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(warm_s)
    body = {"model": "base", "prompt": long_prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    joined = time.monotonic()
    first = None
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    before = [b - a for arr in arrivals for a, b in zip(arr, arr[1:]) if joined - warm_s <= a and b <= joined]
    # Every gap that overlaps the prefill window [joined, first token].
    during = [b - a for arr in arrivals for a, b in zip(arr, arr[1:]) if b > joined and a < first]
    produced = sum(len(a) for a in arrivals)
    span = max(max(a) for a in arrivals if a) - min(min(a) for a in arrivals if a)
    median = statistics.median(before)
    p99 = _pct(during, 0.99) / 1000 if during else 0.0  # _pct answers in ms
    return {"median gap before (ms)": round(1000 * median, 1), "p99 gap during join (ms)": round(1000 * p99, 1),
            "max gap during join (ms)": round(1000 * max(during, default=0.0), 1),
            "p99 during / median before": round(p99 / median, 2), "long prompt ttft (ms)": round(1000 * (first - joined), 1),
            "streams tokens/s": round(produced / span, 1)}


def run_prefill_bench(model: str, tiny: bool, budgets: list[int], streams: int = 8, prompt_tokens: int = 1500,
                      max_tokens: int = 400, warm_s: float = 3.0, repeats: int = 1, say=print) -> dict:
    from prefixtune.models import load_shell

    scratch = Path(tempfile.mkdtemp(prefix="prefixtune-bench-prefill-"))
    model = _tiny_model_dir(scratch) if tiny else model
    tokenizer = load_shell(model, torch.float32, fingerprint="").tokenizer
    long_prompt = _long_prompt(tokenizer, prompt_tokens)
    (scratch / "store").mkdir()
    report: dict = {"model": model, "streams": streams, "prompt tokens": prompt_tokens, "runs": {}}
    for budget in budgets:
        flags = ("--max-batch", str(streams + 1), "--served-model-name", "base", "--max-step-tokens", str(budget),
                 "--max-tokens", str(max_tokens))
        with ServerProcess(model, scratch / "store", *flags) as server:
            measure(server.url, long_prompt[:200], streams, 40, 0.5)  # warm-up: first passes of each shape
            runs = [measure(server.url, long_prompt, streams, max_tokens, warm_s) for _ in range(repeats)]
        row = min(runs, key=lambda r: r["p99 during / median before"])
        report["runs"][str(budget)] = row
        say(f"--max-step-tokens {budget or 'off (whole prompts)'}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return report


def save(report: dict, out: str) -> None:
    from prefixtune.fileio import atomic_write_text

    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "prefill.json", json.dumps(report, indent=2))
