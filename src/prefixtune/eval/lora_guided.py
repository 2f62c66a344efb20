"""Guidance for a LoRA adapter: the adapted and the bare model decode the same rows, two forwards per step.

A prefix row and its companion share one mixed batch (engine/generate.py). LoRA changes the weights
themselves, so the base-model rows run as a second batch under PEFT's `disable_adapter()`. The combination
is the engine's (guidance.guided_logits: layout tokens and EOS left to the adapter, the plausibility floor)
and so are the samplers, so `compare` gives LoRA the same guidance it gives the prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from prefixtune.engine.decode import RunningBatch
from prefixtune.engine.guidance import guided_logits, validate_scale
from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows


@torch.no_grad()
def generate_lora_guided(lm, prompts: Sequence[str], seeds: Sequence[int], max_new_tokens: int,
                         temperature: float, top_p: float, scale: float,
                         base_context: Callable[[], AbstractContextManager], min_p: float = 0.0) -> list[str]:
    """Texts of `prompts` from the LoRA-adapted `lm.model`, guided against the same model with LoRA off."""
    validate_scale(scale)
    ids, mask, _ = lm.encode(prompts)
    samplers = [RowSampler(SamplingParams(max_new_tokens, temperature, top_p, 0, seed, min_p=min_p), lm.device)
                for seed in seeds]
    eos, layout = lm.eos_ids(), lm.layout_mask()
    cond, lc = RunningBatch.prefill(lm.model, ids, mask, [None] * len(prompts))  # (B, V)
    with base_context():
        uncond, lu = RunningBatch.prefill(lm.model, ids, mask, [None] * len(prompts))  # (B, V)
    live = list(range(len(prompts)))
    tokens: list[list[int]] = [[] for _ in prompts]
    while live:
        logits = guided_logits(lc, lu, scale, eos_ids=sorted(eos), layout=layout)  # (B, V)
        keep = []
        for slot, (row, token) in enumerate(zip(live, sample_rows(logits, [samplers[r] for r in live]))):
            if token in eos:
                continue
            tokens[row].append(token)
            if len(tokens[row]) < max_new_tokens:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(live):
            cond.select(keep)
            uncond.select(keep)
            live = [live[s] for s in keep]
        step = torch.tensor([tokens[r][-1] for r in live], device=ids.device)  # (B,)
        lc = cond.step(step)
        with base_context():
            lu = uncond.step(step)
    return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


__all__ = ["generate_lora_guided"]
