"""Structured outputs: a row whose text must match a JSON schema, any JSON object, a regex, a grammar or a choice.

xgrammar (Dong et al. 2024; vLLM's default backend) does the work: a request's grammar is compiled once per
distinct spec (the compiler caches by spec) when it is submitted, on the submitting thread, so the engine's
stepping thread never waits for a compile; each admitted row then owns a GrammarMatcher that, every step, fills
the row's bit in a token bitmask (which next tokens keep the text a prefix of a valid one) and accepts the token
the row drew. The model's EOS tokens are the grammar's stop tokens: the mask allows EOS only where the grammar
accepts, and once a grammar can only end, EOS is the one token left, so the row ends there ("stop"). JSON is
compiled without free whitespace (`any_whitespace=False`: one space after ':' and ','), so a small model cannot
wander into endless newlines; strict mode (no properties beyond the schema's) as OpenAI's strict schemas.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

KINDS = ("json", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class StructuredOutput:
    """What a row's output must match: exactly one of the fields (vLLM's structured_outputs, xgrammar's dialects)."""

    json: str | None = None  # a JSON schema (its JSON text)
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})
    regex: str | None = None  # a regular expression the whole output matches
    grammar: str | None = None  # an EBNF grammar (xgrammar's GBNF dialect, rule `root`)
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings

    @property
    def kind(self) -> str:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured output needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        return given[0]

    def validate(self) -> None:
        """A ValueError naming what is wrong with the schema, regex or grammar (parsed, not yet compiled)."""
        _parse(self)

    def source(self) -> tuple[str, str]:
        """(xgrammar dialect, text): json schemas and EBNF as given; a choice as an EBNF alternation."""
        kind = self.kind
        if kind == "json_object":
            return "json", '{"type": "object"}'
        if kind == "choice":
            if not self.choice or any(not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            # JSON string literals are EBNF string literals in xgrammar's dialect (same escapes).
            return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        return kind, getattr(self, kind)


def _error(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ('[11:09:40] /project/cpp/x.cc:83: ...')."""
    text = str(exc).strip()
    text = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)
    return text.replace("Check failed: (error.empty()) is false: ", "")


@lru_cache(maxsize=256)
def _parse(spec: StructuredOutput):
    import xgrammar as xgr

    dialect, text = spec.source()
    name = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}[dialect]
    if dialect == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON schema: not JSON ({err})") from None
    try:
        if dialect == "json":
            return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        if dialect == "regex":
            return xgr.Grammar.from_regex(text)
        return xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"invalid {name}: {_error(err)}") from None


class Grammars:
    """Compiles specs for one tokenizer and logits width (xgrammar's TokenizerInfo is built once, lazily: ~0.6 s
    for a 49k vocabulary) and caches the compiled grammars by spec. Thread-safe."""

    def __init__(self, tokenizer, width: int, eos_ids: set[int]):
        self._tokenizer, self.width, self.eos_ids = tokenizer, width, sorted(eos_ids)
        self._lock = threading.Lock()
        self._compiler = None
        self._compiled: dict[StructuredOutput, object] = {}

    def compile(self, spec: StructuredOutput):
        grammar = _parse(spec)  # ValueError naming the problem
        with self._lock:
            if spec in self._compiled:
                return self._compiled[spec]
            if self._compiler is None:
                self._compiler = _compiler(self._tokenizer, self.width, tuple(self.eos_ids))
            try:
                compiled = self._compiler.compile_grammar(grammar)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"structured output could not be compiled: {_error(err)}") from None
            if len(self._compiled) >= 256:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[spec] = compiled
            return compiled


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(width, eos): compiler}
_COMPILERS_LOCK = threading.Lock()


def _compiler(tokenizer, width: int, eos_ids: tuple[int, ...]):
    """One xgrammar compiler per tokenizer object and logits width: offline generate builds an engine per call."""
    import xgrammar as xgr

    with _COMPILERS_LOCK:
        per = _COMPILERS.setdefault(tokenizer, {})
        if (width, eos_ids) not in per:
            # Its own copy: a fast tokenizer used from two threads at once fails ("Already borrowed").
            info = xgr.TokenizerInfo.from_huggingface(copy.deepcopy(tokenizer), vocab_size=max(width, len(tokenizer)),
                                                      stop_token_ids=list(eos_ids))
            per[(width, eos_ids)] = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        return per[(width, eos_ids)]


class RowGrammar:
    """One row's position in its grammar (written by the engine's worker only)."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab = compiled.tokenizer_info.vocab_size  # the bitmask's width (>= the logits' when padded)

    def accept(self, token: int) -> bool:
        """Advance past the drawn token; False if the grammar refuses it (the mask should have prevented it)."""
        if self.matcher.is_terminated():
            return True
        return bool(self.matcher.accept_token(token))


def constrain(logits: torch.Tensor, rows: list[int], grammars: list[RowGrammar]) -> torch.Tensor:
    """logits (B, V) with each of `rows` (slot indices) masked to the tokens its grammar allows next."""
    if not rows:
        return logits
    import xgrammar as xgr

    width = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(rows), grammars[0].vocab)  # (R, ceil(vocab / 32)) int32, on the CPU
    for i, g in enumerate(grammars):
        g.matcher.fill_next_token_bitmask(bitmask, i)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    x = logits.index_select(0, index).float()  # (R, V)
    xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device), vocab_size=min(width, grammars[0].vocab))
    return logits.index_copy(0, index, x.to(logits.dtype))
