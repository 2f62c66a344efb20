"""Each label's most distinctive words in the training texts: the `{label_words}` of an init text.

A per-label prefix initialised from the frozen model's keys/values of a text starts as that text would act
in context. "i feel {label} because" gives one word per label; the words the label's own texts use far more
than the others' ("angry, annoyed, bitter, irritated..." for anger) give the start the data's vocabulary.
Words are ranked by the log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008,
"Fightin' Words"), which does not favour rare words the way a plain frequency ratio does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PLACEHOLDER = "{label_words}"
PRIOR = 100.0  # pseudo-counts of the prior (the corpus's own word frequencies)


def distinctive_words(texts: Sequence[str], labels: Sequence[str], k: int = 12) -> dict[str, list[str]]:
    """The `k` words most typical of each label's texts against all other texts, best first."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(lowercase=True)
    counts = vectorizer.fit_transform(texts)  # (rows, vocab), sparse
    vocab = np.asarray(vectorizer.get_feature_names_out())
    total = np.asarray(counts.sum(axis=0)).ravel().astype(float)  # (vocab,)
    prior = total / total.sum() * PRIOR
    y = np.asarray(labels)
    out: dict[str, list[str]] = {}
    for label in dict.fromkeys(labels):
        mine = np.asarray(counts[y == label].sum(axis=0)).ravel().astype(float)
        rest = total - mine
        log_odds = (np.log((mine + prior) / (mine.sum() + PRIOR - mine - prior))
                    - np.log((rest + prior) / (rest.sum() + PRIOR - rest - prior)))
        z = log_odds / np.sqrt(1 / (mine + prior) + 1 / (rest + prior))
        out[label] = [str(w) for w in vocab[np.argsort(-z)[:k]]]
    return out


def mixed_words(words: dict[str, list[str]], k: int = 12) -> list[str]:
    """Round-robin over the labels' lists: the start of a family's unconditional adapter."""
    ranked = [w for rank in zip(*words.values()) for w in rank]
    return list(dict.fromkeys(ranked))[:k]


def fill_label_words(text: str, words: list[str]) -> str:
    return text.replace(PLACEHOLDER, " ".join(words))


__all__ = ["PLACEHOLDER", "distinctive_words", "fill_label_words", "mixed_words"]
