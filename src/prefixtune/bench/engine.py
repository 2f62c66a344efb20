"""`prefixtune bench engine`: the engine's speed against baselines measured in the same run, one table.

- decode: the engine in this process and in its own process (as `prefixtune serve` runs it) vs a bare
  `transformers` greedy loop (forward + argmax over a DynamicCache) at each batch size, same torch threads;
- eager vs the compiled decode step (engine/compiled.py), with the compile time;
- float32 vs bf16 (only on a CPU with native bf16 or a GPU, unless --force-bf16: emulated bf16 is only slower);
- int8 and fp16 quantized bases vs float32 at batch 1 and the largest (prefixtune.quantize), greedy agreement;
- prefill tokens/s: the engine vs one bare forward of the same prompts;
- prefix overhead: decode tokens/s with P virtual tokens per row vs none, at batch 1 and the largest batch.

Every pair alternates and keeps the best of `repeats` (a shared machine only ever adds time).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from prefixtune.bench.engine_overhead import bare_loop_tokens_per_s, client_tokens_per_s, engine_tokens_per_s
from prefixtune.engine.offline import run_requests
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.runtime import cpu_bf16, cpu_info


@dataclass
class EngineBenchConfig:
    """What `bench engine` measures (each field is a flag of the command)."""

    model: str = "tiny"  # tiny (a random 2-layer llama: the engine's own costs show) or a base model name
    batches: tuple[int, ...] = (1, 16, 32)  # decode batch sizes
    new_tokens: int = 32  # tokens generated per row
    prefill_tokens: int = 128  # prompt tokens per row in the prefill measurement
    prefix_lengths: tuple[int, ...] = (0, 10, 20, 50, 100)  # virtual tokens per row in the prefix sweep
    repeats: int = 2  # alternating runs per pair (the best counts)
    compile: bool = True  # measure the compiled decode step (compiling takes seconds to minutes)
    quantize: bool = True  # measure the --quantize modes (int8, fp16) at batch 1 and the largest batch
    force_bf16: bool = False  # measure bf16 even on a CPU without native bf16
    served: bool = True  # also the engine in its own process (starts a second process)


def _best(fn: Callable[[], float], repeats: int) -> float:
    return max(fn() for _ in range(repeats))


def _offline_tps(lm, prompt: list[int], batch: int, new_tokens: int, prefix: torch.Tensor | None = None) -> float:
    """Decode tokens/s of `batch` greedy rows stepped in this thread (the engine offline callers run)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    requests = [Request(list(prompt), None, params, prefix=prefix) for _ in range(batch)]
    start = time.perf_counter()
    run_requests(lm, requests)
    return batch * new_tokens / (time.perf_counter() - start)


def _greedy(lm, prompt: list[int], new_tokens: int) -> list[int]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return run_requests(lm, [Request(list(prompt), None, params)])[0].tokens


@torch.no_grad()
def generate_tps(model, prompt: list[int], batch: int, new_tokens: int) -> float:
    """transformers' own `model.generate` (greedy, exactly new_tokens), the baseline users reach for first."""
    ids = torch.tensor([prompt] * batch, device=next(model.parameters()).device)  # (B, T)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, pad_token_id=0)
    return batch * new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def _bare_prefill_tps(model, prompt: list[int], batch: int) -> float:
    ids = torch.tensor([prompt] * batch, device=next(model.parameters()).device)  # (B, T)
    start = time.perf_counter()
    model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).logits.tolist()
    return batch * len(prompt) / (time.perf_counter() - start)


def _engine_prefill_tps(lm, prompt: list[int], batch: int) -> float:
    """Prompt tokens/s of `batch` rows that each generate one token (sampled from the prefill's logits). Distinct
    prompts (the last token differs), so the engine cannot prefill them once and copy."""
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    requests = [Request(list(prompt[:-1]) + [prompt[-1] + i], None, params) for i in range(batch)]
    start = time.perf_counter()
    run_requests(lm, requests)
    return batch * len(prompt) / (time.perf_counter() - start)


def _long_prompt(prompt: list[int], cfg: EngineBenchConfig) -> list[int]:
    """`prompt` repeated to cfg.prefill_tokens tokens (the prefill measurements' prompt)."""
    return (prompt * cfg.prefill_tokens)[:cfg.prefill_tokens]


def _sibling(lm, model):
    """A PrefixLM over another copy of the base model (bf16, quantized), same tokenizer and store."""
    from prefixtune.engine.lm import PrefixLM

    return PrefixLM(replace(lm.loaded, model=model, dtype=next(model.parameters()).dtype), lm.store)


def decode_table(lm, cfg: EngineBenchConfig, prompt: list[int], say) -> dict[str, Any]:
    """Engine (in process, served) vs the bare loop at each batch size."""
    out: dict[str, Any] = {}
    client = None
    if cfg.served:
        from prefixtune.engine.client import EngineClient, EngineSpec

        client = EngineClient(EngineSpec(lm.loaded.path, str(lm.store.root), device=str(lm.device),
                                         dtype=str(lm.dtype).removeprefix("torch."), max_batch=max(cfg.batches),
                                         threads=torch.get_num_threads()))
        client.start()
    try:
        for b in cfg.batches:
            bare = ours = served = hf = 0.0
            for _ in range(cfg.repeats):
                bare = max(bare, bare_loop_tokens_per_s(lm.model, prompt, b, cfg.new_tokens))
                hf = max(hf, generate_tps(lm.model, prompt, b, cfg.new_tokens))
                ours = max(ours, engine_tokens_per_s(lm, prompt, b, cfg.new_tokens))
                if client is not None:
                    served = max(served, client_tokens_per_s(client, prompt, b, cfg.new_tokens))
            out[f"batch {b}"] = {"bare": bare, "engine": ours, "served": served or None, "model.generate": hf}
            say(f"decode batch {b:>3}: bare transformers loop {bare:7.0f} tok/s | model.generate {hf:7.0f} | engine "
                f"in process {ours:7.0f} ({ours / bare:.2f}x)"
                + (f" | served {served:7.0f} ({served / bare:.2f}x)" if client else ""))
    finally:
        if client is not None:
            client.shutdown(timeout=1.0, drain=False)
    return out


def bare_step_ms(tokens_per_s: float, batch: int) -> float:
    return batch / tokens_per_s * 1e3


@torch.no_grad()
def head_floor_ms(model, batch: int, repeats: int, steps: int = 32) -> float:
    """Milliseconds of the LM head + argmax alone for `batch` rows, the part of a greedy step no engine removes
    (every way of decoding runs this matmul over the whole vocabulary): the bare loop's step over it is the most
    any engine can gain over that loop."""
    head = model.get_output_embeddings()
    hidden = torch.randn(batch, head.weight.shape[1], dtype=head.weight.dtype, device=head.weight.device)  # (B, H)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            head(hidden).argmax(-1).tolist()
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


def compiled_table(lm, cfg: EngineBenchConfig, prompt: list[int], say) -> dict[str, Any]:
    """The in-process engine eager vs with the compiled decode step, and the bare loop beside them."""
    from prefixtune.engine.compiled import compile_decode

    step = compile_decode(lm, max(cfg.batches), say=lambda m: None)
    if step.failed:
        say(f"compiled step: failed ({step.failed}); skipped")
        return {"failed": step.failed}
    out: dict[str, Any] = {"compile_s": step.compile_s}
    say(f"compiled decode step: warm-up {step.compile_s:.1f} s")
    same = _greedy(lm, prompt, cfg.new_tokens)
    try:
        for b in cfg.batches:
            eager = compiled = bare = 0.0
            for _ in range(cfg.repeats):
                bare = max(bare, bare_loop_tokens_per_s(lm.model, prompt, b, cfg.new_tokens))
                lm.compiled_decode = None
                eager = max(eager, engine_tokens_per_s(lm, prompt, b, cfg.new_tokens))
                lm.compiled_decode = step
                compiled = max(compiled, engine_tokens_per_s(lm, prompt, b, cfg.new_tokens))
            ceiling = bare_step_ms(bare, b) / head_floor_ms(lm.model, b, cfg.repeats)
            out[f"batch {b}"] = {"eager": eager, "compiled": compiled, "bare": bare, "ceiling vs bare": ceiling}
            say(f"compiled batch {b:>3}: {compiled:7.0f} tok/s = {compiled / eager:.2f}x eager engine, "
                f"{compiled / bare:.2f}x bare loop (ceiling {ceiling:.2f}x: the LM head + argmax alone)")
    finally:
        lm.compiled_decode = None
    out["greedy identical"] = same == _greedy(lm, prompt, cfg.new_tokens)
    say(f"compiled vs eager greedy tokens identical: {out['greedy identical']}")
    return out


def bf16_table(lm, cfg: EngineBenchConfig, prompt: list[int], say) -> dict[str, Any]:
    native, evidence = (True, "cuda") if lm.device.type == "cuda" else cpu_bf16()
    if not (native or cfg.force_bf16):
        say(f"bf16: skipped: no bf16 on {cpu_info()[0]} ({evidence}); --force-bf16 measures it anyway")
        return {"skipped": f"no bf16 on {cpu_info()[0]} ({evidence})"}
    half = _sibling(lm, copy.deepcopy(lm.model).to(torch.bfloat16))
    out: dict[str, Any] = {}
    for b in (min(cfg.batches), max(cfg.batches)):
        f32 = _best(lambda: _offline_tps(lm, prompt, b, cfg.new_tokens), cfg.repeats)
        bf = _best(lambda: _offline_tps(half, prompt, b, cfg.new_tokens), cfg.repeats)
        out[f"decode batch {b}"] = {"float32": f32, "bfloat16": bf}
        say(f"bf16 decode batch {b:>3}: {bf:7.0f} tok/s = {bf / f32:.2f}x float32")
    long = _long_prompt(prompt, cfg)
    f32 = _best(lambda: _engine_prefill_tps(lm, long, max(cfg.batches)), cfg.repeats)
    bf = _best(lambda: _engine_prefill_tps(half, long, max(cfg.batches)), cfg.repeats)
    out["prefill"] = {"float32": f32, "bfloat16": bf}
    same = _greedy(lm, prompt, cfg.new_tokens)
    out["greedy agreement"] = _agreement(same, _greedy(half, prompt, cfg.new_tokens))
    say(f"bf16 prefill: {bf:7.0f} tok/s = {bf / f32:.2f}x float32; greedy agreement {out['greedy agreement']:.2f}")
    return out


def _agreement(ref: list[int], got: list[int]) -> float:
    """Share of positions before the first difference (greedy decoding diverges for good after one)."""
    n = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return n / max(len(ref), 1)


def quantized_table(lm, cfg: EngineBenchConfig, prompt: list[int], say) -> dict[str, Any]:
    """Each --quantize mode (prefixtune.quantize) vs float32 at batch 1 and the largest batch, alternating, with
    greedy agreement over `new_tokens`."""
    from prefixtune.quantize import QUANTIZE_CHOICES, quantize_model

    modes = {m: _sibling(lm, quantize_model(copy.deepcopy(lm.model), m)) for m in QUANTIZE_CHOICES}
    ref = _greedy(lm, prompt, cfg.new_tokens)
    out: dict[str, Any] = {m: {"greedy agreement": _agreement(ref, _greedy(q, prompt, cfg.new_tokens))}
                           for m, q in modes.items()}
    for b in sorted({min(cfg.batches), max(cfg.batches)}):
        best = dict.fromkeys(["float32", *modes], 0.0)
        for _ in range(cfg.repeats):
            for name, model in (("float32", lm), *modes.items()):
                best[name] = max(best[name], _offline_tps(model, prompt, b, cfg.new_tokens))
        out[f"float32 batch {b}"] = best["float32"]
        for m in modes:
            out[m][f"batch {b}"] = best[m]
        say(f"quantized batch {b:>3}: " + " | ".join(f"{m} {best[m]:7.1f} tok/s = {best[m] / best['float32']:.2f}x"
                                                     for m in modes) + f" float32 ({best['float32']:.1f})")
    say("quantized greedy tokens agree with float32's up to: "
        + ", ".join(f"{m} {out[m]['greedy agreement']:.0%}" for m in modes) + f" of {cfg.new_tokens}")
    return out


def prefill_table(lm, cfg: EngineBenchConfig, prompt: list[int], say) -> dict[str, Any]:
    long = _long_prompt(prompt, cfg)
    b = max(cfg.batches)
    bare = ours = 0.0
    for _ in range(cfg.repeats):
        bare = max(bare, _bare_prefill_tps(lm.model, long, b))
        ours = max(ours, _engine_prefill_tps(lm, long, b))
    say(f"prefill {b} x {len(long)} tokens: engine {ours:7.0f} tok/s = {ours / bare:.2f}x one bare forward")
    return {"engine": ours, "bare": bare}


def prefix_table(lm, cfg: EngineBenchConfig, prompt: list[int], say) -> dict[str, Any]:
    """Decode tokens/s with P virtual tokens per row (a random prefix) over P = 0."""
    s = lm.shape
    out: dict[str, Any] = {}
    for b in (min(cfg.batches), max(cfg.batches)):
        kv = {p: torch.randn(2 * s.num_layers, s.kv_heads, p, s.head_dim, dtype=lm.dtype, device=lm.device)
              if p else None for p in cfg.prefix_lengths}  # (2L, kv_heads, P, head_dim)
        tps = {p: 0.0 for p in cfg.prefix_lengths}
        for _ in range(cfg.repeats):
            for p in cfg.prefix_lengths:
                tps[p] = max(tps[p], _offline_tps(lm, prompt, b, cfg.new_tokens, kv[p]))
        base = tps[cfg.prefix_lengths[0]]
        out[f"batch {b}"] = tps
        say(f"prefix overhead batch {b:>3}: " + ", ".join(f"P={p} {t / base:.2f}x" for p, t in tps.items())
            + f" (of P={cfg.prefix_lengths[0]}: {base:.0f} tok/s)")
    return out


def run_engine_bench(cfg: EngineBenchConfig, say=print) -> dict[str, Any]:
    """Load the model once (the tiny one into a scratch folder) and print every table; returns them all."""
    import tempfile
    from pathlib import Path

    from prefixtune.engine.lm import PrefixLM

    with tempfile.TemporaryDirectory(prefix="prefixtune-bench-engine-") as scratch:
        model = cfg.model
        if model == "tiny":
            from prefixtune.testing import save_tiny_model

            model = str(save_tiny_model(Path(scratch) / "tiny-llama", arch="llama", seed=0))
        lm = PrefixLM.load(model, store=Path(scratch) / "store", dtype="float32")
        prompt = lm.tokenizer("Once upon a time there was").input_ids
        where = f"{lm.device}" if lm.device.type == "cuda" else f"{cpu_info()[0]}"
        say(f"bench engine: {cfg.model} on {where}, {torch.get_num_threads()} torch thread(s), "
            f"{cfg.new_tokens} new tokens per row, best of {cfg.repeats}")
        report: dict[str, Any] = {"model": cfg.model, "processor": where, "threads": torch.get_num_threads(),
                                  "decode": decode_table(lm, cfg, prompt, say)}
        if cfg.compile:
            report["compiled"] = compiled_table(lm, cfg, prompt, say)
        report["bf16"] = bf16_table(lm, cfg, prompt, say)
        if cfg.quantize:
            report["quantized"] = quantized_table(lm, cfg, prompt, say)
        report["prefill"] = prefill_table(lm, cfg, prompt, say)
        report["prefix"] = prefix_table(lm, cfg, prompt, say)
    return report
