"""Structured outputs: a row whose text must match a JSON schema, any JSON object, a regex, a grammar or a choice.

llguidance (guidance-ai's; vLLM's `guidance` backend) does the work: a request's grammar is compiled once per
distinct spec (cached by spec) when it is submitted, on the submitting thread, so the engine's stepping thread
never waits for a compile; each admitted row then owns a copy of the compiled matcher that, every step, fills the
row's bit in a token bitmask (which next tokens keep the text a prefix of a valid one) and consumes the token the
row drew. The model's EOS tokens are the grammar's stop tokens: the mask allows EOS only where the grammar
accepts, and once a grammar can only end, EOS is the one token left, so the row ends there ("stop"). JSON is
compiled without free whitespace (one space after ':' and ','), so a small model cannot wander into endless
newlines; objects take no properties beyond the schema's (OpenAI's strict schemas) unless the schema says so.
Grammars are EBNF as llama.cpp's GBNF and xgrammar write it (rule `root`; a rule may run over several lines),
converted to llguidance's Lark by its converter, or Lark itself (rule `start`).
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
# No free whitespace: a small model given `[ \n\t]*` between tokens can spend its whole budget on newlines.
# Lenient (keywords llguidance does not implement, e.g. uniqueItems, are ignored) and "\u00e9" escapes allowed
# in strings: what xgrammar accepted before, so no schema that worked is refused now.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True,
                 "json_allow_general_unicode_escapes": True}


@dataclass(frozen=True)
class StructuredOutput:
    """What a row's output must match: exactly one of the fields (vLLM's structured_outputs)."""

    json: str | None = None  # a JSON schema (its JSON text)
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})
    regex: str | None = None  # a regular expression the whole output matches
    grammar: str | None = None  # a grammar: GBNF (llama.cpp's EBNF, rule `root`) or Lark (rule `start`)
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
        """(dialect: json, regex or lark; text): json schemas and regexes as given, GBNF converted to Lark."""
        kind = self.kind
        if kind == "json_object":
            return "json", '{"type": "object"}'
        if kind == "choice":
            if not self.choice or any(not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            # JSON string literals are Lark string literals in llguidance (same escapes).
            return "lark", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        if kind == "grammar":
            return "lark", _to_lark(self.grammar)
        return kind, getattr(self, kind)


_RULE_AHEAD = re.compile(r"(\s|#[^\r\n]*)*([\w-]+\s*::=|$)")  # blank lines and comments, then a rule or the end


def _to_lark(text: str) -> str:
    """Lark as given; GBNF through llguidance's converter, its message kept when the GBNF does not parse."""
    from llguidance.gbnf_to_lark import GrammarParser, is_lark_syntax, resolve

    if is_lark_syntax(text):
        return text

    class Parser(GrammarParser):
        """The converter's GBNF parser, reading xgrammar's EBNF as xgrammar did."""

        def _skip_space(self, pos, allow_newlines):
            pos = super()._skip_space(pos, allow_newlines)
            # A rule's body may go on over several lines: it ends where the next `name ::=` starts (llama.cpp's
            # GBNF ends it at the line's end outside parentheses).
            if not allow_newlines and pos.current() in ("\r", "\n") and not _RULE_AHEAD.match(pos.text, pos.pos):
                pos = super()._skip_space(pos, True)
            return pos

        def _parse_char(self, pos):
            char, after = super()._parse_char(pos)
            if char[:2] not in ("\\u", "\\U"):
                return char, after
            # llguidance 1.9.1's converter drops \u's leading zeros ("\ue9", which its Lark refuses); Lark takes
            # \uXXXX, and a character beyond it stands for itself (never one of GBNF's specials).
            code = int(pos.peek(10)[2:10 if char[1] == "U" else 6], 16)
            return (chr(code) if code > 0xFFFF else f"\\u{code:04x}"), after

    try:
        rules = Parser().parse(text)
        resolve(rules)  # rule references, `root` renamed `start`
    except Exception as err:  # the converter raises bare Exceptions for unknown or missing rules
        raise ValueError(f"invalid grammar: {err}") from None
    return "%llguidance {}\n\n" + "\n\n".join(str(r) for r in sorted(rules.values(), key=lambda r: r.order))


_VALUES = ("const", "enum", "default", "examples")  # keywords whose values are data, not schemas
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema


def _strict(schema):
    """The schema with `additionalProperties: false` on every object schema that lists properties and says
    nothing of others (vLLM's guidance backend does the same), so a model cannot invent keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _MAPS and isinstance(value, dict):  # a property may be named "properties"
            out[key] = {name: _strict(s) for name, s in value.items()}
        else:
            out[key] = value if key in _VALUES else _strict(value)
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _error(message: str) -> str:
    """llguidance's message without its position prefix and its echo of the internal Lark (a '  1 | start: /a(b/'
    line and a caret under it); a regex parser's own caret is kept."""
    lines = message.strip().splitlines()
    echo = {i for i, line in enumerate(lines) if re.match(r"\s*\d+ \|", line)}
    kept = [line for i, line in enumerate(lines) if i not in echo and i - 1 not in echo]
    text = re.sub(r"^(at )?\d+\(\d+\):\s*", "", "\n".join(kept))
    return re.sub(r'^invalid regex ".*?" \(in regex\):\s*', "", text, flags=re.S).strip()


@lru_cache(maxsize=256)
def _parse(spec: StructuredOutput) -> str:
    """llguidance's grammar text for the spec, validated without a tokenizer."""
    from llguidance import LLMatcher, regex_to_lark

    dialect, text = spec.source()
    name = {"json": "JSON schema", "regex": "regex", "lark": "grammar"}[dialect]
    if dialect == "json":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON schema: not JSON ({err})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"invalid JSON schema: a schema is a JSON object, not {text[:40]}")
        grammar = LLMatcher.grammar_from_json_schema(_strict(schema), overrides=_JSON_OPTIONS)
    elif dialect == "regex":
        _check(name, LLMatcher.grammar_from_regex(text))  # its message quotes the regex as given
        # \d and \w are ASCII (JSON Schema's, JavaScript's and xgrammar's), not the Rust crate's Unicode classes,
        # and `.` also matches a newline (as xgrammar's did): the same outputs as before the move to llguidance.
        grammar = LLMatcher.grammar_from_lark(f"start: /(?s:{regex_to_lark(text, 'dw')})/")
    else:
        grammar = LLMatcher.grammar_from_lark(text)
    return _check(name, grammar)


def _check(name: str, grammar: str) -> str:
    from llguidance import LLMatcher

    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"invalid {name}: {_error(problem)}")
    return grammar


@dataclass(frozen=True)
class Compiled:
    """A spec's matcher at the start of its output (copied per row) and the bitmask's width."""

    matcher: object  # llguidance.LLMatcher, never advanced itself
    vocab: int  # the bitmask's width (>= the logits' when padded)


class Grammars:
    """Compiles specs for one tokenizer and logits width (llguidance's token tables are built once, lazily:
    ~1.5 s for a 49k vocabulary) and caches the compiled grammars by spec. Thread-safe."""

    def __init__(self, tokenizer, width: int, eos_ids: set[int]):
        self._tokenizer, self.width, self.eos_ids = tokenizer, width, sorted(eos_ids)
        self._lock = threading.Lock()
        self._compiled: dict[StructuredOutput, Compiled] = {}

    def compile(self, spec: StructuredOutput) -> Compiled:
        from llguidance import LLMatcher

        grammar = _parse(spec)  # ValueError naming the problem
        with self._lock:
            if spec in self._compiled:
                return self._compiled[spec]
            tokenizer = _tokenizer(self._tokenizer, self.width, tuple(self.eos_ids))
            matcher = LLMatcher(tokenizer, grammar, log_level=0)
            if matcher.is_error():
                raise ValueError(f"structured output could not be compiled: {_error(matcher.get_error())}")
            if len(self._compiled) >= 256:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[spec] = Compiled(matcher, tokenizer.vocab_size)
            return self._compiled[spec]


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(width, eos): LLTokenizer}
_TOKENIZERS_LOCK = threading.Lock()


def _tokenizer(tokenizer, width: int, eos_ids: tuple[int, ...]):
    """One llguidance tokenizer per tokenizer object and logits width: offline generate builds an engine per call."""
    import llguidance.hf

    with _TOKENIZERS_LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        if (width, eos_ids) not in per:
            # Its own copy: a fast tokenizer used from two threads at once fails ("Already borrowed").
            per[(width, eos_ids)] = llguidance.hf.from_tokenizer(
                copy.deepcopy(tokenizer), n_vocab=max(width, len(tokenizer)), eos_token=list(eos_ids))
        return per[(width, eos_ids)]


class RowGrammar:
    """One row's position in its grammar (written by the engine's worker only)."""

    def __init__(self, compiled: Compiled):
        self.matcher = compiled.matcher.deep_copy()
        self.vocab = compiled.vocab

    def accept(self, token: int) -> bool:
        """Advance past the drawn token; False if the grammar refuses it (the mask should have prevented it)."""
        if self.matcher.is_stopped():
            return True
        return bool(self.matcher.consume_token(token))


_EXECUTOR = None  # llguidance's thread pool for a batch's mask fills, made on first use


def constrain(logits: torch.Tensor, rows: list[int], grammars: list[RowGrammar]) -> torch.Tensor:
    """logits (B, V) with each of `rows` (slot indices) masked to the tokens its grammar allows next."""
    if not rows:
        return logits
    global _EXECUTOR
    import llguidance
    import llguidance.numpy as lln
    import numpy as np

    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    width = logits.shape[-1]
    words = lln.allocate_token_bitmask(len(rows), grammars[0].vocab)  # (R, ceil(vocab / 32)) int32
    lln.fill_next_token_bitmask_par(_EXECUTOR, [(g.matcher, i) for i, g in enumerate(grammars)], words)
    # Token t is bit t % 32 of word t // 32: little-endian bytes unpacked low bit first are tokens in order.
    bits = torch.from_numpy(np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :width])  # (R, V)
    # An additive 0 / -inf per token (a lookup, then one add): 3x faster than masked_fill on a CPU.
    lut = torch.tensor([float("-inf"), 0.0], dtype=logits.dtype, device=logits.device)
    bias = lut.index_select(0, bits.flatten().to(logits.device, torch.int32)).view(len(rows), width)  # (R, V)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    return logits.index_copy(0, index, logits.index_select(0, index) + bias)
