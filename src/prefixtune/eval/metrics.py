"""Pure metrics over generated texts: conditioning accuracy, diversity, copying, reference overlap."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Conditioning", "conditioning", "copy_rate", "distinct_n", "reference_scores", "CopyIndex"]

_SPACE = re.compile(r"\s+")
# Outputs this long (in words) that sit inside a training text, or training texts this long found inside an
# output, count as copies too: a memorised text cut off by max_new_tokens is still a copy.
_MIN_COPY_WORDS = 8


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over the whole set of outputs (lower-cased words); 0 when there are none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = _norm(text).split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


class CopyIndex:
    """Training texts, normalised once, for asking "is this output a verbatim training text?"."""

    def __init__(self, train_texts: Sequence[str]):
        normed = [_norm(t) for t in train_texts]
        self.exact = set(normed)
        self.long = [t for t in self.exact if len(t.split()) >= _MIN_COPY_WORDS]
        # One newline-joined string: "output in corpus" is then a single fast C substring search.
        self.corpus = "\n" + "\n".join(normed) + "\n"

    def is_copy(self, text: str) -> bool:
        t = _norm(text)
        if not t:
            return False
        if t in self.exact:
            return True
        if len(t.split()) >= _MIN_COPY_WORDS and t in self.corpus:
            return True
        return any(train in t for train in self.long if len(train) <= len(t))


def copy_rate(texts: Sequence[str], index: CopyIndex) -> float:
    """Share of outputs that reproduce a training text verbatim (whitespace and case ignored)."""
    return sum(index.is_copy(t) for t in texts) / len(texts) if texts else 0.0


@dataclass
class Conditioning:
    """How often the judge agrees with the label the text was generated for."""

    accuracy: float  # share of samples whose judged label is the requested one
    per_label: dict[str, float]  # the same, per requested label
    labels: list[str]  # row/column order of the confusion matrix
    confusion: list[list[int]]  # confusion[i][j]: samples asked for labels[i] that the judge called labels[j]
    samples: int  # samples judged

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "per_label": self.per_label, "labels": self.labels,
                "confusion": self.confusion, "samples": self.samples}


def conditioning(requested: Sequence[str], judged: Sequence[str], labels: Sequence[str]) -> Conditioning:
    """Accuracy, per-label accuracy and confusion matrix; a judged label outside `labels` counts as a miss."""
    if len(requested) != len(judged):
        raise ValueError(f"{len(requested)} requested labels but {len(judged)} judged labels")
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    hits: dict[str, list[int]] = {label: [] for label in labels}
    for want, got in zip(requested, judged):
        if want not in index:
            raise ValueError(f"requested label {want!r} is not one of {labels}")
        if got in index:
            matrix[index[want]][index[got]] += 1
        hits[want].append(int(want == got))
    per = {label: sum(h) / len(h) for label, h in hits.items() if h}
    total = sum(int(w == g) for w, g in zip(requested, judged))
    return Conditioning(total / len(requested) if requested else 0.0, per, labels, matrix, len(requested))


def reference_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-L F1 (rouge-score), all on a 0-100 scale."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs but {len(references)} references")
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0, "rows": 0}
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs = [h.strip() for h in hypotheses], [r.strip() for r in references]
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    chrf = sacrebleu.corpus_chrf(hyps, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    return {"bleu": bleu, "chrf": chrf, "rouge_l": 100.0 * rouge, "rows": len(hyps)}
