"""Serving speed: many adapters, one base model. Continuous mixed batching vs grouping by adapter,
and vs PEFT's way (one adapter active at a time, `generate` per adapter group), in the same run."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Output, Request, Scheduler

PROMPTS = ["Text:", "Text: i feel", "Text: today", "Text: my friend"]


def write_random_adapters(loaded, root: Path, count: int, tokens: int = 20) -> list[str]:
    """Random prefixes in a store: speed does not depend on what the prefix learned."""
    from prefixtune.testing import write_random_adapter

    names = [f"bench-{i}" for i in range(count)]
    for i, name in enumerate(names):  # a small scale keeps generations in-distribution-ish
        write_random_adapter(root, name, loaded, tokens=tokens, seed=i, scale=0.1, template="Text:")
    return names


def peft_grouped_tokens_per_s(loaded, store_root: Path, names: list[str], prompts: list[str],
                              adapters: list[str], new_tokens: int) -> float:
    """PEFT: load every adapter into one PeftModel, then per adapter `set_adapter` + one batched generate."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, store_root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store_root / name, adapter_name=name)
    model.eval()
    tok = loaded.tokenizer
    generated = 0
    start = time.perf_counter()
    for name in names:
        group = [p for p, a in zip(prompts, adapters) if a == name]
        if not group:
            continue
        model.set_adapter(name)
        enc = tok(group, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        generated += (out.shape[1] - enc.input_ids.shape[1]) * len(group)
    return generated / (time.perf_counter() - start)


def bench_scheduler(lm, prompts: Sequence[str], adapters: Sequence[str | None], mode: str = "continuous",
                    max_new_tokens: int | Sequence[int] = 32, max_batch: int = 16, timeout: float = 600.0) -> float:
    """Generated tokens per second for all prompts submitted at once (EOS ignored, greedy).

    Pass a list of max_new_tokens to mimic mixed output lengths, where freeing slots early matters.
    """
    if len(adapters) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    scheduler = Scheduler(lm, max_batch=max_batch, max_queue=len(prompts), mode=mode, start=False)
    done = threading.Semaphore(0)

    def emit(out: Output) -> None:
        if out.finish_reason is not None:
            done.release()

    requests = []
    for prompt, adapter, n in zip(prompts, adapters, lengths):
        prefix = None if adapter is None else lm.adapter(adapter).kv  # loaded before the clock starts
        requests.append(Request(lm.tokenizer(prompt).input_ids, adapter,
                                SamplingParams(max_new_tokens=n, ignore_eos=True), emit, prefix))
    scheduler.submit_many(requests)
    start = time.perf_counter()
    scheduler.start()
    finished = sum(done.acquire(timeout=max(0.0, start + timeout - time.perf_counter())) for _ in requests)
    elapsed = time.perf_counter() - start
    scheduler.shutdown(timeout=1.0, drain=False)
    if scheduler.error:
        raise RuntimeError(f"benchmark failed: {scheduler.error}")
    if finished < len(requests) or scheduler.stats.generated_tokens != sum(lengths):
        raise RuntimeError(f"benchmark incomplete after {timeout:.0f} s: {finished} of {len(requests)} requests, "
                           f"{scheduler.stats.generated_tokens} of {sum(lengths)} tokens")
    return scheduler.stats.generated_tokens / max(elapsed, 1e-9)


def bench_shared_prefill(lm, adapter: str | None, n: int = 8, prompt_tokens: int = 256,
                         repeats: int = 3) -> dict[str, float]:
    """n choices of one long prompt with max_tokens 1 (the prefill is the work): prefilled once and copied to
    the n rows (ModelRunner.share_prefill) vs each row prefilling it, alternating, best of each."""
    ids = lm.tokenizer("Text: " + "i feel happy today because the sun is out " * (prompt_tokens // 8 + 1)).input_ids
    ids = ids[:prompt_tokens]
    prefix = None if adapter is None else lm.adapter(adapter).kv
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for share in (False, True):
            scheduler = Scheduler(lm, max_batch=n, max_queue=n, start=False)
            scheduler.runner.share_prefill = share
            scheduler.submit_many([Request(ids, adapter, SamplingParams(max_new_tokens=1, temperature=1.0, seed=i,
                                                                        ignore_eos=True), prefix=prefix)
                                   for i in range(n)])
            start = time.perf_counter()
            while scheduler.run_once():
                pass
            best[share] = min(best[share], time.perf_counter() - start)
    return {"n": n, "prompt_tokens": len(ids), "shared_s": best[True], "separate_s": best[False],
            "speedup": best[False] / max(best[True], 1e-9)}


def run(loaded, adapters: int = 6, requests: int = 24, new_tokens: int = 32, say=print) -> dict[str, float]:
    """Tokens/s per method, and ratios / milliseconds under keys that say so (not tokens/s)."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model
    from prefixtune.store import AdapterStore

    root = Path(tempfile.mkdtemp(prefix="prefixtune-bench-store-"))
    names = write_random_adapters(loaded, root, adapters)
    lm = PrefixLM(loaded, AdapterStore(root))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    rows = [names[i % len(names)] for i in range(requests)]
    # Mixed output lengths, as real traffic: continuous batching frees short rows' slots early.
    lengths = [new_tokens // 2 if i % 3 == 0 else new_tokens for i in range(requests)]
    results: dict[str, float] = {}
    for mode in ("continuous", "grouped"):
        results[f"prefixtune {mode}"] = bench_scheduler(lm, prompts, rows, mode=mode, max_new_tokens=lengths,
                                                        max_batch=requests)
        say(f"prefixtune {mode}: {results[f'prefixtune {mode}']:.1f} generated tokens/s")
    results["peft grouped"] = peft_grouped_tokens_per_s(loaded, root, names, prompts, rows, new_tokens)
    say(f"peft grouped (set_adapter + generate per adapter): {results['peft grouped']:.1f} tokens/s")
    shared = bench_shared_prefill(lm, names[0])
    results["n>1 shared prefill speedup"] = shared["speedup"]
    say(f"n={shared['n']} choices of a {shared['prompt_tokens']}-token prompt (max_tokens 1): prefilled once "
        f"{shared['shared_s'] * 1000:.0f} ms vs once per choice {shared['separate_s'] * 1000:.0f} ms = "
        f"{shared['speedup']:.2f}x")
    results["adapter swap ms"] = measure_swap_ms(lm, names[0], repeats=9)
    start = time.perf_counter()
    load_base_model(loaded.name, device=str(loaded.device))
    results["base reload ms"] = (time.perf_counter() - start) * 1000
    say(f"adapter swap {results['adapter swap ms']:.2f} ms vs base-model reload {results['base reload ms']:.0f} ms")
    return results


def measure_swap_ms(lm, name: str, repeats: int = 5) -> float:
    """Median milliseconds to load adapter `name` from disk onto the model's device (cache dropped each time).

    For the benchmark and for tests that print it; never assert on it (machines differ). The OS file
    cache is warm after the first repeat, as it is for a server swapping among its adapters.
    """
    times: list[float] = []
    for _ in range(max(1, repeats)):
        lm.cache.drop(name)
        start = time.perf_counter()
        lm.adapter(name)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)  # the copy to the device is part of the swap
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
