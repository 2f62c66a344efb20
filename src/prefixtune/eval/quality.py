"""Sample quality a skeptic asks for beside conditioning accuracy, each figure beside the same one for real text.

- the judge's own per-label recall on real text: the ceiling conditioning accuracy can reach;
- mean length (words) and distinct-2 of the samples and of an equal number of real texts;
- base-model perplexity of the samples and of those real texts (fluency, as the frozen model sees it);
- the share of degenerate samples (a character or word repeated 4+ times in a row: ",,,,", "no no no no");
- the share of samples that contain the requested label word itself ("i feel angry");
- a guidance sweep: accuracy, distinct-2 and length against the guidance scale, as a table and a PNG.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefixtune.data import DataBundle, Example
from prefixtune.eval.metrics import conditioning, distinct_n

__all__ = ["degenerate", "sample_stats", "judged_stats", "real_sample", "base_perplexity", "quality_report",
           "plot_sweep", "choose_scale"]

# What a recommended guidance scale must keep (the control-quality bar): natural length, diversity, no loops.
MIN_LENGTH_SHARE = 0.7  # mean words >= this share of real text's
MIN_DISTINCT_2 = 0.7  # distinct-2 of the samples
MAX_DEGENERATE = 0.05  # share of degenerate samples

_CHAR_RUN = re.compile(r"(\S)\1{3,}")  # one non-space character 4+ times in a row


def degenerate(text: str) -> bool:
    """A character or a word repeated 4+ times in a row (",,,,", "haaaaa", "no no no no")."""
    if _CHAR_RUN.search(text):
        return True
    words = text.lower().split()
    return any(words[i] == words[i + 1] == words[i + 2] == words[i + 3] for i in range(len(words) - 3))


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word.lower())}\b", text.lower()) is not None


def sample_stats(texts: Sequence[str], labels: Sequence[str | None]) -> dict[str, Any]:
    """Length, diversity, degenerate share and label-word share of a set of texts."""
    if not texts:
        return {"n": 0}
    labelled = [(t, label) for t, label in zip(texts, labels) if label]
    return {
        "n": len(texts),
        "mean_words": statistics.mean(len(t.split()) for t in texts),
        "distinct_2": distinct_n(texts, 2),
        "degenerate": sum(map(degenerate, texts)) / len(texts),
        "label_word": sum(_has_word(t, label) for t, label in labelled) / len(labelled) if labelled else None,
    }


def judged_stats(samples: Sequence[dict[str, Any]], judge, labels: Sequence[str | None]) -> dict[str, Any]:
    """sample_stats of generated samples ({"label", "text"}) plus the judge's accuracy, per label and worst."""
    texts = [s["text"] for s in samples]
    row: dict[str, Any] = {**sample_stats(texts, [s["label"] for s in samples]), "accuracy": None}
    labelled = [label for label in labels if label is not None]
    if judge is not None and labelled:
        cond = conditioning([s["label"] for s in samples], judge.predict(texts), labelled)
        row["accuracy"], row["per_label"] = cond.accuracy, cond.per_label
        row["worst_label"] = min(cond.per_label.values())
    return row


def real_sample(data: DataBundle, split: str, labels: Sequence[str | None], per_label: int, seed: int
                ) -> list[Example]:
    """`per_label` real texts of each label (seeded), the yardstick for the same number of samples."""
    rows = data.split(split)
    rng = random.Random(seed + 17)
    out: list[Example] = []
    for label in labels:
        pool = [ex for ex in rows if label is None or ex.label == label]
        out.extend(rng.sample(pool, min(per_label, len(pool))))
    return out


@torch.no_grad()
def base_perplexity(lm, texts: Sequence[str], batch_size: int = 16) -> float | None:
    """Perplexity of the texts under the bare base model (BOS + text + EOS; no prefix, no prompt)."""
    from prefixtune.prefix.model import PrefixModel
    from prefixtune.train.evaluation import eval_loss
    from prefixtune.train.examples import tokenize

    examples = [Example(t) for t in texts if t.strip()]
    if not examples:
        return None
    rows, _ = tokenize(examples, lm.tokenizer, "", lambda ex: "base", 256)
    rows.sort(key=lambda r: len(r.input_ids))
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    result = eval_loss(PrefixModel(lm.model), rows, pad, batch_size, lm.device, prefix_of=lambda _: None)
    return math.exp(min(result.loss, 50))


def judge_ceiling(judge) -> dict[str, Any] | None:
    """What the judge scores on real text: conditioning accuracy cannot be trusted beyond it."""
    per = getattr(judge, "per_label_accuracy", None)
    if not per:
        return None
    return {"macro": getattr(judge, "macro_accuracy", None), "per_label": dict(per),
            "split": getattr(judge, "accuracy_split", None)}


def quality_report(lm, samples: list[dict[str, Any]], data: DataBundle, labels: Sequence[str | None],
                   split: str, per_label: int, seed: int, judge=None, batch_size: int = 16) -> dict[str, Any]:
    """Sample figures beside real-text figures (same count per label), plus the judge's ceiling."""
    texts = [s["text"] for s in samples]
    real = real_sample(data, split, labels, per_label, seed)
    real_texts = [ex.text for ex in real]
    out = {"samples": sample_stats(texts, [s["label"] for s in samples]),
           "real": sample_stats(real_texts, [ex.label for ex in real]),
           "ceiling": judge_ceiling(judge) if judge is not None else None}
    out["samples"]["base_perplexity"] = base_perplexity(lm, texts, batch_size)
    out["real"]["base_perplexity"] = base_perplexity(lm, real_texts, batch_size)
    if judge is not None and any(labels):
        judged = judge.predict(real_texts)
        out["real"]["judge_accuracy"] = conditioning([ex.label for ex in real], judged,
                                                     [x for x in labels if x]).accuracy
    return out


def plot_sweep(rows: list[dict[str, Any]], real: dict[str, Any] | None, path: Path, title: str) -> Path:
    """Accuracy, distinct-2 and length (relative to real text) against the guidance scale."""
    from prefixtune.eval.report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    scales = [r["guidance_scale"] for r in rows]
    ax.plot(scales, [r["accuracy"] for r in rows], "o-", label="conditioning accuracy")
    ax.plot(scales, [r["distinct_2"] for r in rows], "s-", label="distinct-2")
    if real and real.get("mean_words"):
        ax.plot(scales, [r["mean_words"] / real["mean_words"] for r in rows], "^-", label="length / real length")
        ax.axhline(real["distinct_2"], color="tab:orange", ls=":", lw=1, label="distinct-2 of real text")
    if rows and rows[0].get("ceiling") is not None:
        ax.axhline(rows[0]["ceiling"], color="tab:blue", ls=":", lw=1, label="judge ceiling (real text)")
    ax.plot(scales, [r["degenerate"] for r in rows], "x--", color="gray", label="degenerate share")
    ax.set_xlabel("guidance scale (1 = off)")
    ax.set_ylim(0, 1.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def choose_scale(rows: list[dict[str, Any]], real: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sweep row with the best accuracy among those that keep natural text (ties: the smaller scale).

    Kept: mean length >= MIN_LENGTH_SHARE of real text's, distinct-2 >= MIN_DISTINCT_2, degenerate share
    <= MAX_DEGENERATE. None when no row qualifies or the sweep has no accuracy (no judge).
    """
    length = (real or {}).get("mean_words") or 0.0
    ok = [r for r in rows if r.get("accuracy") is not None and r["mean_words"] >= MIN_LENGTH_SHARE * length
          and r["distinct_2"] >= MIN_DISTINCT_2 and r["degenerate"] <= MAX_DEGENERATE]
    return max(ok, key=lambda r: (r["accuracy"], -r["guidance_scale"]), default=None)
