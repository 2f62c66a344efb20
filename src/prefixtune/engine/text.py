"""Streaming text for one generated row: incremental detokenizing in bounded time per token, and stop strings
matched in bounded time per character, never leaking a stop string.

Re-decoding every token each step cost 0.04 -> 0.52 ms per token per row by token 1024, and matching four
20 KB stop strings by re-scanning the tail cost 4.4 ms per token per row. Here a token costs a decode of a
few tokens (vLLM's prefix/read offsets) and each new character one automaton step per stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
MAX_PENDING = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte tokens


class IncrementalDetokenizer:
    """New text per token by decoding only a window of recent tokens (as vLLM's detokenizer).

    `prefix` .. `read` is the window already turned into text; decoding `ids[prefix:]` and removing the text
    of `ids[prefix:read]` gives the new text with the tokenizer's spacing rules intact (a token's leading
    space depends on its left neighbour). A text ending in U+FFFD is a half character: wait for the next
    token, at most MAX_PENDING tokens (after that the bytes can never complete).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        # A fast tokenizer's Rust decoder directly (4x less per call than the Python wrapper), unless the
        # wrapper would change the text (clean_up_tokenization_spaces).
        fast = getattr(tokenizer, "_tokenizer", None)
        raw = fast is not None and hasattr(fast, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                             False)
        self._raw = fast if raw else None

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._raw is not None:
            return self._raw.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is pending, half characters included (the row ended)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read >= len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        waiting = len(self.ids) - self.read < MAX_PENDING
        if not final and waiting and (len(text) <= len(before) or text.endswith(REPLACEMENT)):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class StopMatcher:
    """Finds the earliest end of any stop string in a character stream (Knuth-Morris-Pratt automata).

    `feed` costs O(new characters x stops) amortized however long the stop strings are; `held` is how many
    trailing characters could still begin a stop string (they must not be streamed yet).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # characters of each stop matched at the end of the text so far

    def feed(self, text: str) -> int | None:
        """Advance over `text`; returns the index in `text` where a completed stop string starts, or None."""
        # A stop string with nothing matched so far stays at state 0 unless its first character occurs in the
        # text: one C-level `in` skips it (the usual case for every stop, on every token).
        active = [i for i, stop in enumerate(self.stops) if self.state[i] or stop[0] in text]
        if not active:
            return None
        for pos, ch in enumerate(text):
            starts = []
            for i in active:
                stop, k, fail = self.stops[i], self.state[i], self.fail[i]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    starts.append(pos + 1 - k)
                    k = fail[k - 1]
                self.state[i] = k
            if starts:
                return min(starts)  # may be negative: the stop began in earlier text
        return None

    @property
    def held(self) -> int:
        return max(self.state, default=0)


def _failure(pattern: str) -> list[int]:
    fail, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class TextTracker:
    """One row's stream: push(token) -> (new text safe to send, whether a stop string ended the text)."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stops)
        self.pending = ""  # text decoded but held back (could start a stop string)
        self.stopped = False

    @property
    def tokens(self) -> list[int]:
        return self.detok.ids

    def push(self, token: int) -> tuple[str, bool]:
        return self._take(self.detok.push(token))

    def flush(self) -> str:
        """Everything not yet emitted (the row ended without a stop string)."""
        if self.stopped:
            return ""
        text, stopped = self._take(self.detok.flush())
        if stopped:
            return text
        text, self.pending = text + self.pending, ""
        return text

    def _take(self, new: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        start = self.matcher.feed(new)
        text = self.pending + new
        if start is not None:
            self.stopped = True
            cut = len(self.pending) + start  # index in `text` where the stop string begins
            self.pending = ""
            return text[:max(cut, 0)], True
        keep = self.matcher.held
        if keep:
            self.pending = text[len(text) - keep:]
            return text[:len(text) - keep], False
        self.pending = ""
        return text, False


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
