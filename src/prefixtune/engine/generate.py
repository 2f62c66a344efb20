"""Static-batch generation: prefill once, decode every row to its end (offline `generate`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prefixtune.engine.decode import RunningBatch
from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)  # generated token ids (EOS not included)
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"


def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefixes: Sequence[torch.Tensor | None],
    params: Sequence[SamplingParams],
    eos_ids: set[int],
    stop_check: Callable[[int, list[int]], bool] | None = None,
) -> list[RowOutput]:
    """Decode a left-padded batch (B, T); finished rows leave the batch so they cost nothing more."""
    device = input_ids.device
    samplers = [RowSampler(p, device) for p in params]
    outputs = [RowOutput() for _ in params]
    batch, logits = RunningBatch.prefill(model, input_ids, attention_mask, prefixes)
    live = list(range(len(params)))  # original row index of each batch row
    while live:
        tokens = sample_rows(logits, [samplers[r] for r in live])
        keep, next_tokens = [], []
        for slot, (row, token) in enumerate(zip(live, tokens)):
            out, p = outputs[row], params[row]
            if token in eos_ids and not p.ignore_eos:
                out.finish_reason = "stop"
                continue
            out.tokens.append(token)
            if stop_check is not None and stop_check(row, out.tokens):
                out.finish_reason = "stop"
            elif len(out.tokens) >= p.max_new_tokens:
                out.finish_reason = "length"
            else:
                keep.append(slot)
                next_tokens.append(token)
        if not keep:
            break
        if len(keep) < len(live):
            batch.select(keep)
            live = [live[s] for s in keep]
        logits = batch.step(torch.tensor(next_tokens, device=device))
    return outputs
