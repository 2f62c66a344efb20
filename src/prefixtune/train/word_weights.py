"""Label-word loss weights: each label's adapter counts its label's distinctive words `weight` times.

Weighted cross-entropy moves the loss's optimum from the data's next-token distribution p to q ∝ p·w: the
adapter learns to say its label's words (`train/label_words.py`: "angry, mad, irritated..." for anger) w
times as readily as its texts do, where they fit, and every other token keeps its relative probability. It
costs no extra forward. Without it a 150-step family learns the data's style fast and its labels slowly:
sampled unguided with min-p 0.05 the unweighted demo family scored 0.53 with the judge, at weight 10 0.83
(docs/BENCHMARKS.md "Control quality"). Only the first token of each word is weighted, where the word is chosen, and
only the row's first label word: weighting every occurrence gave 0.52 at plain T=1 (the shipped variant:
0.35) but taught "funny funny funny" loops (the texts have one or two).
The family's unconditional adapter (NAME-all) stays unweighted: it is the guidance negative and must keep
the data's mix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def word_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of each word, spelled after a space (mid-sentence) and alone (text start)."""
    ids = set()
    for word in words:
        for spelling in (" " + word, word):
            pieces = tokenizer.encode(spelling, add_special_tokens=False)
            if pieces:
                ids.add(pieces[0])
    return sorted(ids)


class WordWeights:
    """Per-token loss weights for a batch, from each row's adapter and its target tokens."""

    def __init__(self, token_ids: dict[str, list[int]], weight: float, vocab_size: int):
        self.index = {name: i for i, name in enumerate(token_ids)}
        vocab_size = max([vocab_size] + [max(ids) + 1 for ids in token_ids.values() if ids])
        self.table = torch.ones(len(token_ids) + 1, vocab_size)  # (adapters + 1, V); the last row: unweighted
        for name, ids in token_ids.items():
            self.table[self.index[name], ids] = weight

    def __call__(self, adapters: Sequence[str], labels: torch.Tensor) -> torch.Tensor:
        """(B, T) weights aligned with `labels` (B, T); positions without a label (-100) get 1 (never scored)."""
        if self.table.device != labels.device:  # once: the lookup then stays on the labels' device (no host sync)
            self.table = self.table.to(labels.device)
        rows = torch.tensor([self.index.get(a, len(self.index)) for a in adapters], device=labels.device)  # (B,)
        weights = self.table[rows.view(-1, 1), labels.clamp(min=0)]  # (B, T)
        words = (weights != 1) & (labels != -100)  # (B, T)
        later = words & (words.cumsum(-1) > 1)  # (B, T): a label word after the row's first one
        return weights.masked_fill(later, 1.0)


__all__ = ["WordWeights", "word_token_ids"]
