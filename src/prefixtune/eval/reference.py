"""Reference evaluation of task adapters: rows with the same input are one item with several references.

Each distinct input is decoded once (greedy or beam search) and scored against all of its references:
corpus BLEU and chrF (sacrebleu, multi-reference), ROUGE-L F1 (rouge-score, best reference per item),
mean output length. METEOR is not reported: no maintained package here offers it without NLTK's WordNet
data, which cannot be downloaded offline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefixtune.data import DataError, Example
from prefixtune.templates import fill_fields

__all__ = ["ReferenceItem", "DecodeSettings", "group_items", "corpus_scores", "decode_items", "score_methods"]


@dataclass
class ReferenceItem:
    """One distinct input and every reference written for it."""

    inputs: dict[str, str]  # the template's fields
    label: str | None  # the row's label, when the template also names {label}
    references: list[str] = field(default_factory=list)  # every target written for this input


@dataclass
class DecodeSettings:
    """How items are decoded for scoring (the same for every method compared)."""

    num_beams: int = 1  # 1 = greedy, more = beam search
    max_new_tokens: int = 64  # tokens per output at most (items raise it to their longest reference + 8)
    batch_size: int = 16  # inputs decoded together
    length_penalty: float = 1.0  # beam search: score = log-prob / length ** this
    no_repeat_ngram_size: int = 0  # beam search: never repeat an n-gram of this size (0 = off)
    progress: bool = True  # show a progress bar


def group_items(examples: Sequence[Example], references: Sequence[str] | None = None) -> list[ReferenceItem]:
    """Rows with the same inputs (and label) become one item, in first-seen order; references default to the
    rows' target text."""
    refs = [ex.text for ex in examples] if references is None else list(references)
    if len(refs) != len(examples):
        raise DataError(f"{len(refs)} references for {len(examples)} rows")
    items: dict[tuple, ReferenceItem] = {}
    for ex, ref in zip(examples, refs):
        key = (ex.inputs, ex.label)
        item = items.get(key)
        if item is None:
            item = items[key] = ReferenceItem(ex.values, ex.label)
        ref = ref.strip()
        if ref and ref not in item.references:
            item.references.append(ref)
    return [item for item in items.values() if item.references]


def sample_items(items: list[ReferenceItem], limit: int | None, seed: int) -> list[ReferenceItem]:
    """A seeded sample of `limit` items in their original order (all of them when fewer)."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def corpus_scores(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU / chrF over all references of each item, mean best-reference ROUGE-L F1, mean words; 0-100."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} reference lists")
    if not outputs:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0, "mean_words": 0.0, "items": 0, "references": 0}
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = [o.strip() for o in outputs]
    width = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; None pads items with fewer references (it skips them).
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(list(refs), h)["rougeL"].fmeasure for h, refs in zip(hyps, references))
    return {"bleu": sacrebleu.corpus_bleu(hyps, streams).score, "chrf": sacrebleu.corpus_chrf(hyps, streams).score,
            "rouge_l": 100.0 * rouge / len(hyps), "mean_words": sum(len(h.split()) for h in hyps) / len(hyps),
            "items": len(hyps), "references": sum(len(r) for r in references)}


def item_prompts(template: str, items: Sequence[ReferenceItem]) -> list[str]:
    """Each item's prompt: the training template filled with its inputs (and label)."""
    return [fill_fields(template, item.inputs, item.label) for item in items]


def output_budget(lm, items: Sequence[ReferenceItem], settings: DecodeSettings) -> int:
    """Enough new tokens for the longest reference (+8), and at least settings.max_new_tokens."""
    longest = max((len(lm.tokenizer(r, add_special_tokens=False).input_ids) for item in items
                   for r in item.references), default=0)
    return max(settings.max_new_tokens, longest + 8)


def decode_items(lm, prompts: Sequence[str], adapter: str | None, settings: DecodeSettings, max_new_tokens: int,
                 desc: str = "decoding") -> list[str]:
    """One output per prompt with `adapter` (None = the base model), in batches."""
    from tqdm.auto import tqdm

    outputs: list[str] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not settings.progress, dynamic_ncols=True, leave=False)
    beams = dict(num_beams=settings.num_beams, length_penalty=settings.length_penalty,
                 no_repeat_ngram_size=settings.no_repeat_ngram_size) if settings.num_beams > 1 else {}
    for start in range(0, len(prompts), settings.batch_size):
        part = list(prompts[start:start + settings.batch_size])
        got = lm.generate(part, [adapter] * len(part), max_new_tokens=max_new_tokens, **beams)
        outputs.extend(g.text.strip() for g in got)
        bar.update(len(part))
    bar.close()
    return outputs


def score_methods(lm, methods: dict[str, tuple[str | None, Any]], template: str, items: Sequence[ReferenceItem],
                  settings: DecodeSettings, say=print) -> dict[str, dict[str, Any]]:
    """Decode and score every method on the same items: name -> (adapter or None, context manager factory or
    None, e.g. LoRA applied). Returns name -> scores + a few examples + every output."""
    from contextlib import nullcontext

    prompts = item_prompts(template, items)
    budget = output_budget(lm, items, settings)
    refs = [item.references for item in items]
    results = {}
    for name, (adapter, context) in methods.items():
        with context() if context is not None else nullcontext():
            outputs = decode_items(lm, prompts, adapter, settings, budget, f"{name}: decoding")
        scores = corpus_scores(outputs, refs)
        scores.update(decoding="greedy" if settings.num_beams == 1 else f"beam {settings.num_beams}",
                      max_new_tokens=budget, outputs=outputs,
                      examples=[{"prompt": p, "output": o, "references": r}
                                for p, o, r in list(zip(prompts, outputs, refs))[:5]])
        say(f"{name} ({scores['decoding']}): BLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}, ROUGE-L "
            f"{scores['rouge_l']:.1f}, {scores['mean_words']:.1f} words on {len(items)} inputs")
        results[name] = scores
    return results


def scores_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of reference scores, one line per method (and decoding)."""
    lines = ["| method | decoding | BLEU | chrF | ROUGE-L | mean words | inputs | references |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['decoding']} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['rouge_l']:.1f} | "
                     f"{r['mean_words']:.1f} | {r['items']} | {r['references']} |")
    return "\n".join(lines)
