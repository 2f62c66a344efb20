"""Log-probabilities in OpenAI's shapes: the legacy completions format (echo included) and chat's `logprobs`.

The engine records (logprob, top [(id, logprob)]) per token (engine/logprobs.py says of which distribution);
here ids become token strings (each id decoded alone, on the text thread: a fast tokenizer must not be shared
across threads) and offsets into the choice's text. A log-probability of -inf (a token guidance or a grammar
made impossible) is sent as -9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from prefixtune.server.protocol import APIError

NEG_INF = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else NEG_INF


def ids_of(tokens: Iterable[int], entries: Iterable) -> set[int]:
    """Every token id a response names: the tokens and their alternatives."""
    ids = set(tokens)
    for entry in entries:
        if entry is not None:
            ids.update(i for i, _ in entry[1])
    return ids


def token_strings(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Each id's own text (run on the text thread)."""
    return {i: tokenizer.decode([i]) for i in ids}


def scored(out) -> list[int]:
    """The tokens an output's logprobs describe: its tokens, and the EOS that ended it (not text, but scored)."""
    return out.token_ids + ([out.stop_token] if out.stop_token is not None else [])


def check_beams(body, beams: dict | None) -> None:
    if beams is not None and (body.token_logprobs() is not None or body.prompt_logprobs() is not None):
        raise APIError(400, "logprobs are not returned for beam search; drop logprobs or use num_beams 1",
                       param="logprobs")


def legacy(strings: dict[int, str], tokens: Sequence[int], entries: Sequence, offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions `logprobs` for tokens whose text starts at character `offset` of the choice's text;
    each top_logprobs dict holds the top N and the token itself (as vLLM)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        text = strings[token]
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:  # the prompt's first token
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        logprob, top = entry
        alternatives = {strings[i]: _finite(lp) for i, lp in top}
        alternatives.setdefault(text, _finite(logprob))
        out["token_logprobs"].append(_finite(logprob))
        out["top_logprobs"].append(alternatives)
    return out


def join(first: dict[str, list] | None, second: dict[str, list]) -> dict[str, list]:
    return second if first is None else {key: first[key] + second[key] for key in second}


def chat(strings: dict[int, str], tokens: Sequence[int], entries: Sequence) -> dict[str, Any]:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]} (top N exactly)."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = strings[token]
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(token, lp), "top_logprobs": [item(i, v) for i, v in top]}
                        for token, (lp, top) in zip(tokens, entries)]}


class Formatter:
    """One request's log-probabilities and echo, for its whole response or chunk by chunk (stream).

    Choice i is prompt i // n's (n choices per prompt). Token strings are fetched on the text thread before use
    (`prepare`); the formatting itself runs on the event loop.
    """

    def __init__(self, state, body, prompts: list[list[int]]):
        self.state, self.n, self.prompts = state, body.n, prompts
        self.echo = bool(getattr(body, "echo", False))
        self.top = body.token_logprobs()  # None: no logprobs in the response
        self.texts: list[str] = []  # each prompt's text (echo)
        self.strings: dict[int, str] = {}
        self.offsets: dict[int, int] = {}  # choice -> characters of its text so far (text_offset)
        self.echoed: set[int] = set()

    @classmethod
    async def create(cls, state, body, prompts: list[list[int]]) -> Formatter | None:
        """None when the request asks for neither logprobs nor echo (then nothing here runs)."""
        self = cls(state, body, prompts)
        if not self.echo and self.top is None:
            return None
        if self.echo:
            self.texts = await state.on_text_thread(lambda: [state.tokenizer.decode(p) for p in prompts])
        return self

    async def prepare(self, outputs: Iterable) -> None:
        """Fetch the strings of every token the outputs (Output or jobs.Choice) will name."""
        if self.top is None:
            return
        ids: set[int] = set()
        for out in outputs:
            ids |= ids_of(scored(out), [*(out.logprobs or []), *(out.prompt_logprobs or [])])
        if self.echo:
            ids |= {t for p in self.prompts for t in p}
        ids -= self.strings.keys()
        if ids:
            self.strings.update(await self.state.on_text_thread(token_strings, self.state.tokenizer, ids))

    def completion(self, index: int, text: str, out) -> tuple[str, dict | None]:
        """(text, logprobs) of choice `index`'s next piece: the prompt first when echoing, then its tokens."""
        p, logprobs = index // self.n, None
        if self.echo and index not in self.echoed:
            self.echoed.add(index)
            text = self.texts[p] + text
            self.offsets[index] = len(self.texts[p])
            if self.top is not None:
                logprobs = legacy(self.strings, self.prompts[p], out.prompt_logprobs or [None] * len(self.prompts[p]))
        tokens = scored(out)
        if self.top is not None and tokens:
            start = self.offsets.get(index, 0)
            logprobs = join(logprobs, legacy(self.strings, tokens, out.logprobs, start))
            self.offsets[index] = start + sum(len(self.strings[t]) for t in tokens)
        return text, logprobs

    def chat(self, out) -> dict | None:
        return None if self.top is None else chat(self.strings, scored(out), out.logprobs or [])
