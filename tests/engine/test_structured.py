"""Structured outputs (llguidance): constrained rows match their grammar, free rows beside them are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from prefixtune.engine.offline import run_requests
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.structured import Grammars, RowGrammar, StructuredOutput, constrain

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "mood": {"enum": ["calm", "angry"]}},
          "required": ["ok", "n", "mood"], "additionalProperties": False}


def _request(lm, prompt: str, adapter: str | None, structured=None, **params) -> Request:
    params = {"max_new_tokens": 48, **params}
    return Request(lm.tokenizer(prompt).input_ids, adapter, SamplingParams(structured=structured, **params))


def test_constrained_rows_match_beside_free_rows_of_other_adapters(lm):
    """Sampled JSON-schema, choice, regex and grammar rows (one guided) share the batch with free greedy rows;
    every constrained row matches and ends by EOS ("stop"), every free row equals its solo run."""
    specs = [
        ("Hi", "a", StructuredOutput(json=json.dumps(SCHEMA)), dict(temperature=1.0, seed=1)),
        ("Hi", "b", StructuredOutput(json=json.dumps(SCHEMA)), dict(temperature=1.0, seed=2, guidance_scale=2.0)),
        ("The weather", None, StructuredOutput(choice=("sunny", "rain, later")), dict(temperature=1.0, seed=3)),
        ("Order", "a", StructuredOutput(regex=r"[A-Z]{2}-[0-9]{3}"), dict(temperature=1.0, seed=4)),
        ("Say", "b", StructuredOutput(grammar='root ::= "yes" | "no" ("!" | "")'), dict(temperature=1.0, seed=5)),
        ("The weather today is", "a", None, dict(ignore_eos=True, max_new_tokens=12)),
        ("Hi there", "b", None, dict(ignore_eos=True, max_new_tokens=12)),
    ]
    requests = [_request(lm, p, a, s, **kw) for p, a, s, kw in specs]
    got = run_requests(lm, requests)
    for r in got[:5]:
        assert r.finish_reason == "stop", r.text
    for r in got[:2]:
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert got[2].text in ("sunny", "rain, later")
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", got[3].text)
    assert got[4].text in ("yes", "no", "no!")
    for spec, mixed in zip(specs[5:], got[5:]):
        assert mixed.tokens == run_requests(lm, [_request(lm, spec[0], spec[1], None, **spec[3])])[0].tokens


def test_json_object_and_a_short_budget(lm):
    got = run_requests(lm, [_request(lm, "Hi", None, StructuredOutput(json_object=True), max_new_tokens=3),
                            _request(lm, "Hi", None, StructuredOutput(choice=("abc",)))])
    assert got[0].finish_reason == "length" and got[0].text.startswith("{")  # cut off, as OpenAI's
    assert (got[1].text, got[1].finish_reason) == ("abc", "stop")


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput(json='{"type": "objekt"}'), 'invalid JSON schema: Invalid type: objekt'),
    (StructuredOutput(json="{not json"), "invalid JSON schema: not JSON"),
    (StructuredOutput(regex="a(b"), "invalid regex: regex parse error:\n    a(b\n     ^\nerror: unclosed group"),
    (StructuredOutput(grammar="root ::= foo"), "invalid grammar: Rule 'foo' not found"),
    (StructuredOutput(), "exactly one of json, json_object, regex, grammar, choice; got none"),
    (StructuredOutput(choice=()), "non-empty list"),
    (StructuredOutput(choice=("a", "")), "non-empty strings"),
    (StructuredOutput(regex="a", grammar='root ::= "a"'), "got regex, grammar"),
])
def test_bad_specs_are_refused_naming_the_problem(spec, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(structured=spec).validate()
    assert message in str(err.value)


def test_eos_is_the_grammars_to_give_not_the_callers():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured=StructuredOutput(choice=("a",)), ignore_eos=True).validate()
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(structured=StructuredOutput(choice=("a",)), num_beams=2).validate()


def test_padded_logits_mask_the_padding_and_leave_other_rows(lm):
    """A model may score more ids than its tokenizer has (padded embeddings): those ids are never allowed."""
    width = len(lm.tokenizer) + 64
    grammars = Grammars(lm.tokenizer, width, set(lm.eos_ids()))
    row = RowGrammar(grammars.compile(StructuredOutput(choice=("yes", "no"))))
    logits = torch.randn(3, width)
    out = constrain(logits, [1], [row])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed and all(lm.tokenizer.decode([t]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    assert not torch.isfinite(out[1, len(lm.tokenizer):]).any()
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    spec = StructuredOutput(choice=("yes", "no"))
    assert grammars.compile(spec) is grammars.compile(spec)  # compiled once per spec


def _walk(lm, spec: StructuredOutput, text: str) -> bool:
    """Whether `text`'s tokens, then EOS, are all accepted by the spec's grammar."""
    row = RowGrammar(Grammars(lm.tokenizer, len(lm.tokenizer), set(lm.eos_ids())).compile(spec))
    tokens = lm.tokenizer(text, add_special_tokens=False).input_ids + [min(lm.eos_ids())]
    return all(row.accept(t) for t in tokens)


def test_objects_take_no_keys_beyond_the_schemas_unless_it_says_so(lm):
    """OpenAI's strict schemas: a schema that lists properties and says nothing of others refuses invented keys."""
    closed = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    open_ = {**closed, "additionalProperties": True}
    assert _walk(lm, StructuredOutput(json=json.dumps(closed)), '{"a": 1}')
    assert not _walk(lm, StructuredOutput(json=json.dumps(closed)), '{"a": 1, "b": 2}')
    assert _walk(lm, StructuredOutput(json=json.dumps(open_)), '{"a": 1, "b": 2}')
    assert not _walk(lm, StructuredOutput(json=json.dumps(closed)), '{"a":1}')  # no free whitespace either
    named = {"type": "object", "properties": {"properties": {"const": {"properties": 1}}}}  # names, data: not schemas
    assert _walk(lm, StructuredOutput(json=json.dumps(named)), '{"properties": {"properties": 1}}')
    assert not _walk(lm, StructuredOutput(json=json.dumps(named)), '{"additionalProperties": 1}')


@pytest.mark.parametrize("grammar", [
    'root ::= "caf\\u00e9 " [\\u0041-\\u0043]{2} smile\nsmile ::= "\\U0001F600" # GBNF escapes',
    'start: "caf\\u00e9 " /[A-C]{2}/ smile\nsmile: "\U0001F600"',  # Lark, as given
    # xgrammar's EBNF: a rule's body goes on over lines until the next `name ::=`
    'root ::= "caf\\u00e9 " ab\n    smile  # a comment\n\nab ::= [A-C]{2}\n  | "ZZ"\nsmile ::= "\\U0001F600"',
])
def test_grammars_are_gbnf_or_lark(lm, grammar):
    spec = StructuredOutput(grammar=grammar)
    assert _walk(lm, spec, "café AB\U0001F600")
    assert not _walk(lm, spec, "café AD\U0001F600")


def test_regex_classes_are_ascii_and_dot_takes_a_newline(lm):
    """JSON Schema's (and JavaScript's) \\d and \\w, not the Rust crate's Unicode ones."""
    assert _walk(lm, StructuredOutput(regex=r"\d+ \w.b"), "12 x\nb")
    assert not _walk(lm, StructuredOutput(regex=r"\d+"), "\u0663")  # ARABIC-INDIC DIGIT THREE
    assert not _walk(lm, StructuredOutput(regex=r"\w+"), "é")
