"""Engine requests for offline rows (PrefixLM.generate and .score): each row's tokens, prefix, seed and guidance.

Kept apart from engine/lm.py so the model facade stays about loading and resolving adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from prefixtune.engine import compose
from prefixtune.engine.guidance import validate_scale
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.models import max_positions


def build_requests(lm, prompts: Sequence[str], adapters: Sequence[str | None], seeds: Sequence[int | None],
                   base: SamplingParams, guide: tuple[float | None, str | None], lora, add_special_tokens: bool,
                   experts: dict[str, compose.Experts] | None = None) -> list[Request]:
    """One engine Request per row: its tokens, prefix, seed and guidance (`guide`: what the caller gave);
    `experts`: the composed adapters run as a product of experts (their rows carry no single prefix)."""
    experts = experts or {}
    # One lookup per distinct adapter: the same tensor object on many rows is shared (prefilled once), and a
    # small cache cannot evict a row's adapter between its rows.
    kv = {a: lm.adapter(a).kv for a in dict.fromkeys(adapters) if a is not None and a not in experts}
    guides = {a: lm.guidance(a, *guide) if base.num_beams == 1 else (1.0, None) for a in kv}
    guides[None] = base_guidance(guide[0], lora) if base.num_beams == 1 else (1.0, None)
    negative_kv = {n: lm.adapter(n).kv for n in {g[1] for g in guides.values()} if n is not None}
    ids = lm.tokenizer(list(prompts), add_special_tokens=add_special_tokens).input_ids
    if not all(ids):
        raise ValueError(f"prompt(s) {[i for i, row in enumerate(ids) if not row]} tokenize to nothing; give "
                         "each row some text")
    requests = []
    for prompt_ids, a, seed in zip(ids, adapters, seeds):
        if a in experts:  # its scales live in the experts; the group's row 0 samples unguided
            params = replace(base, seed=seed, stop=list(base.stop))
            params.validate()
            requests.append(Request(list(prompt_ids), a, params, experts=experts[a]))
            continue
        scale, negative = guides[a]
        params = replace(base, seed=seed, guidance_scale=scale, stop=list(base.stop))
        params.validate()
        requests.append(Request(list(prompt_ids), a, params, prefix=kv.get(a), negative=negative,
                                negative_prefix=negative_kv.get(negative) if params.guided else None))
    virtual = [r.experts.virtual if r.experts else max(0 if x is None else int(x.shape[2])
                                                         for x in (r.prefix, r.negative_prefix))
               for r in requests]
    check_positions(lm, [len(r.prompt_ids) for r in requests], virtual, base.max_new_tokens)
    return requests

def base_guidance(scale: float | None, lora) -> tuple[float, None]:
    """Base-model rows have nothing to sharpen (unguided beside guided adapter rows), except the rows of a
    LoRA model: they are guided against the same model with LoRA off."""
    if lora is None or scale is None:
        return 1.0, None
    validate_scale(scale)
    return float(scale), None


def check_positions(lm, lengths: Sequence[int], virtual: Sequence[int], max_new_tokens: int) -> None:
    """Refuse rows that would run past the model's positions (learned position tables crash there)."""
    limit = max_positions(lm.model.config)
    if limit is None:
        return
    need = max(n + p for n, p in zip(lengths, virtual)) + max_new_tokens
    if need > limit:
        raise ValueError(
            f"{need} positions needed (virtual tokens + prompt + max_new_tokens) but {lm.loaded.name} has "
            f"{limit}; shorten the prompt or lower max_new_tokens"
        )
