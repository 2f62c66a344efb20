"""Static-batch generation: prefill once, decode every row to its end (offline `generate`).

A guided row (params.guidance_scale != 1) runs with a companion row in the same batch: same prompt, the
negative prefix (None = the base model). The pair draws one token from the guided distribution, both rows
take it, and they leave the batch together (engine/guidance.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prefixtune.engine.decode import RunningBatch
from prefixtune.engine.guidance import guided_logits
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
    negatives: Sequence[torch.Tensor | None] | None = None,
    layout: torch.Tensor | None = None,
) -> list[RowOutput]:
    """Decode a left-padded batch (B, T); finished rows leave the batch so they cost nothing more.

    negatives[i] is the unconditioned prefix of row i when params[i] is guided (None = the base model);
    `layout` marks the tokens guidance leaves to the adapter (guidance.layout_mask).
    """
    device = input_ids.device
    samplers = [RowSampler(p, device) for p in params]
    outputs = [RowOutput() for _ in params]
    guided = [i for i, p in enumerate(params) if p.guided]
    negatives = list(negatives) if negatives is not None else [None] * len(params)
    # Companion rows go after the B primary rows: batch row B + j is the companion of row guided[j].
    index = torch.tensor(guided, dtype=torch.long, device=device)
    ids = torch.cat([input_ids, input_ids.index_select(0, index)])  # (B + G, T)
    mask = torch.cat([attention_mask, attention_mask.index_select(0, index)])  # (B + G, T)
    batch, logits = RunningBatch.prefill(model, ids, mask, list(prefixes) + [negatives[i] for i in guided])
    live = list(range(len(params)))  # original row index of each primary batch row
    pairs = list(guided)  # original row index of each companion batch row
    while live:
        logits = _combine(logits, live, pairs, params, eos_ids, layout)
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
        kept_rows = [live[s] for s in keep]
        kept_pairs = [r for r in pairs if outputs[r].finish_reason is None]
        if len(keep) < len(live) or len(kept_pairs) < len(pairs):
            position = {r: s for s, r in enumerate(pairs)}
            batch.select(keep + [len(live) + position[r] for r in kept_pairs])
            live, pairs = kept_rows, kept_pairs
        token_of = dict(zip(kept_rows, next_tokens))
        step = next_tokens + [token_of[r] for r in pairs]  # a companion takes its row's token
        logits = batch.step(torch.tensor(step, device=device))
    return outputs


def _combine(logits: torch.Tensor, live: list[int], pairs: list[int], params: Sequence[SamplingParams],
             eos_ids: set[int], layout: torch.Tensor | None = None) -> torch.Tensor:
    """Primary rows' logits (B, V), guided ones replaced by the group's combined log-probabilities."""
    primary = logits[: len(live)]  # (B, V)
    if not pairs:
        return primary
    slot = {r: s for s, r in enumerate(live)}
    rows = torch.tensor([slot[r] for r in pairs], dtype=torch.long, device=logits.device)
    scale = torch.tensor([params[r].guidance_scale for r in pairs], device=logits.device)
    combined = guided_logits(primary.index_select(0, rows), logits[len(live):], scale, eos_ids=eos_ids,
                             layout=layout)  # (G, V)
    return primary.float().index_copy(0, rows, combined)
