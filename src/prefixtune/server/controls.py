"""Penalties, logit_bias and structured outputs of /v1/completions and /v1/chat/completions, checked strictly.

OpenAI's `presence_penalty`, `frequency_penalty` and `logit_bias`, vLLM's `repetition_penalty`, OpenAI's chat
`response_format` (`{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema"}}`:
what `client.chat.completions.parse(response_format=PydanticModel)` sends) and vLLM's `structured_outputs`
extension (`json`, `json_object`, `regex`, `choice`, `grammar`) become SamplingParams fields of every row of
the request (engine/penalties.py, engine/structured.py). A schema, regex or grammar that does not parse is a
400 naming the problem; so are settings beam search cannot take.
"""

from __future__ import annotations

import json
from typing import Any

from prefixtune.engine.structured import StructuredOutput
from prefixtune.server.protocol import APIError

NEUTRAL = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
           "logit_bias": (None, {})}


def control_fields(body, vocab: int, grammars=None) -> dict[str, Any]:
    """SamplingParams fields for this body's penalties, bias and structured output (all rows share them).

    Runs off the event loop: parsing a large schema takes milliseconds. `grammars`: an in-process engine's
    compiler (engine/structured.Grammars), warmed here so its submit, on the event loop, finds the grammar cached
    (an engine process compiles on its own command thread instead)."""
    structured, param = structured_of(body)
    if body.num_beams > 1:
        given = [name for name, neutral in NEUTRAL.items() if getattr(body, name) not in neutral]
        given += [param] if structured is not None else []
        if given:
            raise APIError(400, f"{given[0]} with num_beams={body.num_beams}: beam search takes no penalties, "
                                "logit_bias or structured output; drop it, or sample with num_beams 1",
                           param=given[0])
    bias = {int(token): float(value) for token, value in (body.logit_bias or {}).items()}
    bad = next((t for t in bias if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"logit_bias token id {bad} is out of range: token ids lie in [0, {vocab})",
                       param="logit_bias")
    if structured is not None:
        if body.ignore_eos:
            raise APIError(400, "ignore_eos with a structured output: the grammar ends the output; drop "
                                "ignore_eos", param="ignore_eos")
        try:
            structured.validate()
            if grammars is not None:
                grammars.compile(structured)
        except ValueError as err:
            raise APIError(400, str(err), param=param) from None
    return dict(presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                logit_bias=bias, structured=structured)


def has_grammar(body) -> bool:
    return body.structured_outputs is not None or getattr(body, "response_format", None) is not None


def structured_of(body) -> tuple[StructuredOutput | None, str | None]:
    """The body's structured output and the field it came from (response_format or structured_outputs)."""
    fmt = getattr(body, "response_format", None)
    so = body.structured_outputs
    from_format = None
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format type json_schema needs a json_schema object "
                                    '({"name": ..., "schema": {...}})', param="response_format")
            schema = fmt.json_schema.schema_
            from_format = (StructuredOutput(json=_canonical(schema)) if schema is not None
                           else StructuredOutput(json_object=True))
        else:
            from_format = StructuredOutput(json_object=True)
    if fmt is not None and fmt.type != "json_schema" and fmt.json_schema is not None:
        raise APIError(400, f"response_format type {fmt.type} takes no json_schema; use type json_schema",
                       param="response_format")
    if so is None:
        return from_format, "response_format"
    if from_format is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    spec = StructuredOutput(json=None if so.json_ is None else so.json_ if isinstance(so.json_, str)
                            else _canonical(so.json_),
                            json_object=bool(so.json_object), regex=so.regex, grammar=so.grammar,
                            choice=None if so.choice is None else tuple(so.choice))
    try:
        spec.kind
    except ValueError as err:
        raise APIError(400, str(err), param="structured_outputs") from None
    return spec, "structured_outputs"


def _canonical(schema: dict[str, Any]) -> str:
    """One text per schema (sorted keys), so equal schemas share a compiled grammar."""
    return json.dumps(schema, sort_keys=True, ensure_ascii=False)
