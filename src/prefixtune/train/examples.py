"""Examples -> token ids with loss masks, and length-grouped batches with no padding waste."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixtune.data import Example
from prefixtune.templates import fill_template


@dataclass
class Tokenized:
    input_ids: list[int]  # prompt + " " + text + EOS, tokenized together
    prompt_len: int  # leading tokens that get no loss (the prompt)
    adapter: str  # which adapter this row trains


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) -100 on prompt and pad tokens
    adapters: list[str]  # adapter per row

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows(self, start: int, stop: int) -> Batch:
        """A micro-batch of rows [start, stop), trimmed to its own longest row."""
        mask = self.attention_mask[start:stop]
        width = int(mask.sum(-1).max())
        return Batch(self.input_ids[start:stop, :width], mask[:, :width], self.labels[start:stop, :width],
                     self.adapters[start:stop])


def tokenize(
    examples: Sequence[Example],
    tokenizer,
    template: str,
    adapter_of,
    max_length: int,
) -> tuple[list[Tokenized], int]:
    """Tokenize prompt and completion as one string (a separately tokenized trailing space is a
    classic silent quality loss); the prompt's tokens are found by character offsets.

    Returns the rows and how many were truncated to max_length.
    """
    if not examples:  # e.g. --eval-examples 0, or a label filter that leaves no validation rows
        return [], 0
    eos = tokenizer.eos_token_id
    truncated = 0
    rows: list[Tokenized] = []
    prompts = [fill_template(template, ex.label) for ex in examples]
    texts = [f"{p} {ex.text}" if p else ex.text for p, ex in zip(prompts, examples)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    for ex, prompt, ids, offsets in zip(examples, prompts, enc["input_ids"], enc["offset_mapping"]):
        cut = len(prompt)
        # A token belongs to the prompt when it ends inside the prompt; special tokens have (0, 0).
        prompt_len = sum(1 for start, end in offsets if end <= cut and (end > 0 or start == 0))
        ids = list(ids) + [eos]
        if len(ids) > max_length:
            ids = ids[:max_length]
            truncated += 1
        rows.append(Tokenized(ids, min(prompt_len, len(ids) - 1), adapter_of(ex)))
    return rows, truncated


def collate(rows: Sequence[Tokenized], pad_id: int) -> Batch:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        mask[i, :n] = 1
        labels[i, r.prompt_len:n] = ids[i, r.prompt_len:n]
    return Batch(ids, mask, labels, [r.adapter for r in rows])


def epoch_batches(rows: Sequence[Tokenized], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices per batch for one epoch: shuffled, then grouped by length so batches pad little.

    Deterministic in (seed, epoch), so a resumed run replays the same order. Rows are sorted by length
    inside windows of 50 batches (not globally), so batches still mix lengths and labels across the epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = batch_size * 50
    grouped: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(rows[i].input_ids))
        grouped.extend(chunk)
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches
