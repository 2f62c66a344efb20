"""Streaming text for one generated row: incremental detokenizing that never leaks a stop string."""

from __future__ import annotations

from collections.abc import Sequence

from prefixtune.engine.lm import cut_at_stop


class TextTracker:
    """Incremental detokenizer of one row: decode all tokens, emit the new suffix.

    Decoding the whole list (not token by token) keeps multi-token characters and tokenizer spacing exactly
    as an offline decode; text that could be the start of a stop string, or a half UTF-8 character (U+FFFD),
    is held back until the next token decides it.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text, whether a stop string ended the text)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut, stopped = cut_at_stop(text, self.stops)
        if stopped:
            return self._take(cut, len(cut)), True
        # Drop a half-decoded character first: a stop string's start right before it must be held back too.
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        end -= max((_overlap(text[:end], s) for s in self.stops), default=0)
        return self._take(text, end), False

    def flush(self) -> str:
        """Everything not yet emitted (the row ended without a stop string)."""
        if not self.tokens:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
