"""What a request must satisfy to enter the engine, and the room it holds once in.

`check_request` runs in `Scheduler.submit_many` on the submitting thread (a structured request's grammar is
compiled there, never on the stepping thread); `resolve_prefixes` runs when the policy admits the request, on
the stepping thread, reading the adapter LRU under the scheduler's lock; `cost` is the room the scheduler
and the server count against `max_inflight_tokens`.
"""

from __future__ import annotations

import torch

from prefixtune.engine.penalties import check_bias_ids
from prefixtune.engine.policy import rows_of
from prefixtune.engine.requests import Request
from prefixtune.engine.structured import Grammars


def cost(request: Request) -> int:
    """Batch room a request holds while in flight: prompt + max_new_tokens on each of its rows."""
    return rows_of(request) * (len(request.prompt_ids) + request.params.max_new_tokens)


def check_request(r: Request, max_batch: int, max_model_len: int | None, width: int, grammars: Grammars) -> None:
    """Refuse a request the engine could never run (a ValueError naming why); compile its grammar (cached)."""
    r.params.validate()
    if not r.prompt_ids:
        raise ValueError("prompt is empty: at least one token is needed")
    if rows_of(r) > max_batch:
        what = ("a composed request" if r.experts is not None else "a guided request" if r.params.guided
                else f"num_beams={r.params.num_beams}")
        raise ValueError(f"{what} needs {rows_of(r)} batch rows but max_batch is {max_batch}")
    check_length(r, max_model_len)
    check_bias_ids(r.params.logit_bias, width)
    if r.params.structured is not None and r.grammar is None:
        r.grammar = grammars.compile(r.params.structured)


def check_length(r: Request, max_model_len: int | None, prefix_len: int | None = None) -> None:
    """Virtual + prompt + new tokens must fit max_model_len; `prefix_len` None: from what the request holds
    (an adapter named but not yet loaded counts 0 here and is checked again by resolve_prefixes)."""
    if max_model_len is None:
        return
    if prefix_len is None and r.experts is not None:
        prefix_len = r.experts.virtual
    if prefix_len is None:
        prefix_len = max(0 if p is None else int(p.shape[2]) for p in (r.prefix, r.negative_prefix))
    need = prefix_len + len(r.prompt_ids) + r.params.max_new_tokens
    if need > max_model_len:
        raise ValueError(
            f"{prefix_len} virtual + {len(r.prompt_ids)} prompt + {r.params.max_new_tokens} new tokens = "
            f"{need} > max_model_len {max_model_len}"
        )


def resolve_prefixes(r: Request, lm, lm_lock, max_model_len: int | None) -> list[torch.Tensor | None]:
    """One prefix per row of the request's group (2L, kv_heads, P, head_dim) or None (the base model), read
    from lm's adapter LRU under `lm_lock` (the scheduler's, shared with the admin endpoints)."""
    if r.experts is not None:
        with lm_lock:
            r.experts.resolve(lambda name: lm.adapter(name).kv)
        check_length(r, max_model_len, r.experts.virtual)
        return list(r.experts.prefixes)
    prefix, negative = r.prefix, r.negative_prefix
    if prefix is None and r.adapter is not None:
        with lm_lock:
            prefix = lm.adapter(r.adapter).kv
    if r.params.guided and negative is None and r.negative is not None:
        with lm_lock:
            negative = lm.adapter(r.negative).kv
    virtual = max(0 if p is None else int(p.shape[2]) for p in (prefix, negative))
    check_length(r, max_model_len, virtual)
    return [prefix, negative] if r.params.guided else [prefix] * rows_of(r)
