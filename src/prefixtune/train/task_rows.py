"""Task rows (input fields -> target text) to token ids: the input side is shortened first, never silently the target.

A task template names row fields (`"{meaning_representation}\\n"`); the filled prompt and the target are
tokenized together as one string (as `examples.tokenize` does for label templates), the loss falls on the
target and EOS only. When a row is longer than `max_length`, the longest input value loses tokens from its
end until the row fits; only a target that cannot fit even with empty inputs is cut, and that is counted
and reported. A target longer than the model's context cannot be trained on at all and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prefixtune.data import DataError, Example
from prefixtune.templates import fill_fields
from prefixtune.train.examples import Tokenized

_MAX_ROUNDS = 8  # shortening rounds per row (retokenizing can merge a few tokens differently each time)


@dataclass
class TaskCounts:
    """What --max-length did to the rows."""

    rows: int = 0  # rows tokenized
    inputs_shortened: int = 0  # rows whose input fields lost tokens so the row fits
    targets_cut: int = 0  # rows whose target alone (plus the template) is longer than max_length

    def describe(self, max_length: int, what: str = "training") -> str | None:
        if not (self.inputs_shortened or self.targets_cut):
            return None
        parts = [f"--max-length {max_length}: shortened the input fields of {self.inputs_shortened} of "
                 f"{self.rows} {what} rows"]
        if self.targets_cut:
            parts.append(f"{self.targets_cut} rows' targets were cut because the target alone does not fit "
                         f"(raise --max-length to keep them whole)")
        return "; ".join(parts)


def _encode(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """ids of `prompt + " " + target` (+ special tokens) and how many leading tokens are the prompt's."""
    text = f"{prompt} {target}" if prompt else target
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    cut = len(prompt)
    # A token belongs to the prompt when it ends inside the prompt; special tokens have (0, 0).
    prompt_len = sum(1 for start, end in enc["offset_mapping"] if end <= cut and (end > 0 or start == 0))
    return list(enc["input_ids"]), prompt_len


def _shorten(tokenizer, value: str, drop: int) -> str:
    """`value` without its last `drop` tokens, cut at a token boundary in the original characters."""
    offsets = tokenizer(value, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = max(0, len(offsets) - drop)
    return value[:offsets[keep - 1][1]].rstrip() if keep else ""


def tokenize_task(
    examples: Sequence[Example],
    tokenizer,
    template: str,
    adapter_of: Callable[[Example], str],
    max_length: int,
    context: int | None = None,
) -> tuple[list[Tokenized], TaskCounts]:
    """Rows for a task template; `context` is the most target tokens the model can hold (None = no limit)."""
    eos = tokenizer.eos_token_id
    counts = TaskCounts(rows=len(examples))
    rows: list[Tokenized] = []
    prompts = [fill_fields(template, ex.values, ex.label) for ex in examples]
    # One batched call for every row; only rows that overflow are re-encoded one by one.
    enc = tokenizer([f"{p} {ex.text}" if p else ex.text for p, ex in zip(prompts, examples)],
                    add_special_tokens=True, return_offsets_mapping=True)
    encoded = zip(examples, prompts, enc["input_ids"], enc["offset_mapping"])
    for n, (ex, prompt, first, offsets) in enumerate(encoded, 1):
        values = ex.values
        cut = len(prompt)
        prompt_len = sum(1 for start, end in offsets if end <= cut and (end > 0 or start == 0))
        ids = list(first) + [eos]
        target = len(ids) - prompt_len
        if context is not None and target > context:
            raise DataError(f"row {n} ({ex.text[:60]!r}...): its target alone is {target} tokens (with EOS) but the "
                            f"model holds {context} (its context minus the virtual tokens). Fix: drop or split that "
                            f"row, or use a model with a longer context")
        shortened = False
        for _ in range(_MAX_ROUNDS):
            over = len(ids) - max_length
            longest = max(values, key=lambda k: len(values[k]), default=None)
            if over <= 0 or longest is None or not values[longest]:
                break
            values = {**values, longest: _shorten(tokenizer, values[longest], over)}
            ids, prompt_len = _encode(tokenizer, fill_fields(template, values, ex.label), ex.text)
            ids.append(eos)
            shortened = True
        counts.inputs_shortened += shortened
        if len(ids) > max_length:
            ids = ids[:max_length]
            counts.targets_cut += 1
        rows.append(Tokenized(ids, min(prompt_len, len(ids) - 1), adapter_of(ex)))
    return rows, counts
