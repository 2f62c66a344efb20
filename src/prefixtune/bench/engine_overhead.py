"""Engine overhead on a tiny random model, where the model's own matmuls are cheap and every cost of the engine
shows (as on a fast GPU): our engine at batch B vs a bare `transformers` greedy loop (forward + argmax with a
DynamicCache) at the same batch and torch threads, measured in the same run: the engine in its own process (as
`prefixtune serve` runs it) and in the caller's process."""

from __future__ import annotations

import threading
import time

import torch
from transformers.cache_utils import DynamicCache

from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Output, Request, Scheduler


@torch.no_grad()
def bare_loop_tokens_per_s(model, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    """The floor any engine pays: prefill, then forward one token per row + argmax, `new_tokens` times."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids] * batch, device=device)  # (B, T)
    start = time.perf_counter()
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    token.tolist()  # one sync at the end only: the most favourable floor for the baseline
    return batch * new_tokens / (time.perf_counter() - start)


def engine_tokens_per_s(lm, prompt_ids: list[int], batch: int, new_tokens: int, stop: list[str] | None = None,
                        timeout: float = 300.0, params: SamplingParams | None = None) -> float:
    """All rows submitted at once to a started Scheduler (worker + output threads), greedy, EOS ignored (or each
    row with `params`, which must keep it going for new_tokens)."""
    scheduler = Scheduler(lm, max_batch=batch, max_queue=batch, start=False)
    done = threading.Semaphore(0)

    def emit(out: Output) -> None:
        if out.finish_reason is not None:
            done.release()

    params = params or SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, stop=list(stop or []))
    # Started first, as a server starts it once: starting copies the tokenizer for the output thread (0.4 s
    # measured for SmolLM2's), which no request pays.
    scheduler.start()
    start = time.perf_counter()
    scheduler.submit_many([Request(list(prompt_ids), None, params, emit) for _ in range(batch)])
    for _ in range(batch):
        done.acquire(timeout=timeout)
    elapsed = time.perf_counter() - start
    scheduler.shutdown(timeout=1.0, drain=False)
    return batch * new_tokens / elapsed


def client_tokens_per_s(client, prompt_ids: list[int], batch: int, new_tokens: int, timeout: float = 300.0) -> float:
    """As engine_tokens_per_s, through an EngineClient: the engine process `prefixtune serve` runs by default,
    with the text stage in this process."""
    done = threading.Semaphore(0)

    def emit(out: Output) -> None:
        if out.finish_reason is not None:
            done.release()

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    client.submit_many([Request(list(prompt_ids), None, params, emit) for _ in range(batch)])
    for _ in range(batch):
        done.acquire(timeout=timeout)
    return batch * new_tokens / (time.perf_counter() - start)


def run(lm, batch: int = 16, new_tokens: int = 64, repeats: int = 3, say=print) -> dict[str, float]:
    """Best of `repeats` for each (a shared machine adds noise only ever upward in time): the bare loop, the
    engine in this process (worker + output threads beside the loop's torch threads) and the engine in its own
    process as the server runs it, all at this process's torch threads."""
    from prefixtune.engine.client import EngineClient, EngineSpec

    prompt = lm.tokenizer("Once upon a time there was").input_ids
    threads = torch.get_num_threads()
    client = EngineClient(EngineSpec(lm.loaded.path, str(lm.store.root), device=str(lm.device),
                                     dtype=str(lm.dtype).removeprefix("torch."), max_batch=batch, threads=threads))
    client.start()
    bare = ours = served = 0.0
    try:
        for _ in range(repeats):  # alternating, so a burst of load elsewhere hits every side alike
            bare = max(bare, bare_loop_tokens_per_s(lm.model, prompt, batch, new_tokens))
            ours = max(ours, engine_tokens_per_s(lm, prompt, batch, new_tokens))
            served = max(served, client_tokens_per_s(client, prompt, batch, new_tokens))
    finally:
        client.shutdown(timeout=1.0, drain=False)
    say(f"{lm.loaded.name}, batch {batch}, {threads} torch thread(s): engine process {served:.0f} tokens/s, engine in "
        f"this process {ours:.0f}, bare transformers loop {bare:.0f} = {served / bare:.2f}x / {ours / bare:.2f}x")
    return {"engine tokens/s": served, "engine in this process tokens/s": ours, "bare loop tokens/s": bare,
            "engine / bare": served / bare, "engine in this process / bare": ours / bare}


# At least 100 records: a constrained row never reaches its end (and EOS) within the benchmark's tokens.
RECORDS_SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "required": ["name", "age", "ok"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}, "ok": {"type": "boolean"}}}}


def constrained_cost(lm, batch: int = 16, new_tokens: int = 64, repeats: int = 3, say=print) -> dict[str, float]:
    """Tokens/s of `batch` JSON-schema rows (RECORDS_SCHEMA) vs `batch` unconstrained rows, greedy, alternated in
    the same run (best of `repeats` each): the grammar's per-step cost (mask fill, apply, accept)."""
    import json

    from prefixtune.engine.structured import StructuredOutput

    prompt = lm.tokenizer("Once upon a time there was").input_ids
    spec = StructuredOutput(json=json.dumps(RECORDS_SCHEMA))
    constrained = SamplingParams(max_new_tokens=new_tokens, structured=spec)
    free = schema = 0.0
    for _ in range(repeats):
        free = max(free, engine_tokens_per_s(lm, prompt, batch, new_tokens))
        schema = max(schema, engine_tokens_per_s(lm, prompt, batch, new_tokens, params=constrained))
    say(f"{lm.loaded.name}, batch {batch}, {torch.get_num_threads()} torch thread(s): JSON-schema rows "
        f"{schema:.0f} tokens/s, unconstrained rows {free:.0f} = {schema / free:.2f}x")
    return {"json-schema tokens/s": schema, "unconstrained tokens/s": free, "json-schema / unconstrained": schema / free}
