"""Streaming text against the plain definition (hypothesis): incremental detokenizing and automaton stop
matching give exactly what decoding everything and cutting at the stop string gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from prefixtune.engine.text import cut_at_stop
from prefixtune.engine.text import StopMatcher, TextTracker


class _Pieces:
    """A fake tokenizer whose token i is the text pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


ALPHABET = "ab\n é"
pieces_st = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=30)


def _stream(pieces, stops):
    tracker = TextTracker(_Pieces(pieces), stops)
    out, stopped = "", False
    for i in range(len(pieces)):
        text, stopped = tracker.push(i)
        out += text
        if stopped:
            break
    if not stopped:
        out += tracker.flush()
    return out, stopped


@settings(max_examples=100, deadline=None, derandomize=True)
@given(pieces=pieces_st, stop=st.text(alphabet=ALPHABET, min_size=1, max_size=5))
def test_one_stop_string_streams_exactly_the_cut_text(pieces, stop):
    assert _stream(pieces, [stop]) == cut_at_stop("".join(pieces), [stop])


@settings(max_examples=100, deadline=None, derandomize=True)
@given(pieces=pieces_st, stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=2, max_size=4))
def test_several_stop_strings_end_at_the_first_completed_one(pieces, stops):
    full = "".join(pieces)
    out, stopped = _stream(pieces, stops)
    assert full.startswith(out)
    ends = [i + len(s) for s in stops if (i := full.find(s)) >= 0]
    if not ends:
        assert (out, stopped) == (full, False)
        return
    first_end = min(ends)  # the stream stops as soon as any stop string is complete
    assert stopped and any(full[: first_end].endswith(s) and out == full[: first_end - len(s)] for s in stops)


def test_long_stop_strings_cost_per_character_not_per_stop_length():
    matcher = StopMatcher(["a" * 20_000 + "b"] * 4)
    for _ in range(50):  # each step advances 4 automata by one character each: no rescans of 20 KB
        assert matcher.feed("a" * 10) is None
    assert matcher.held == 500
