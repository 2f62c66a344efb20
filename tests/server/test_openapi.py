"""The API described (/openapi.json, /docs) and fuzzed from that description with schemathesis (issue #24).

schemathesis generates requests for every operation from the schema FastAPI builds out of protocol.py's
request models; each answer must not be a 5xx and must match the documented response schema for its status.
The budget is small here (CI); PREFIXTUNE_SCHEMATHESIS_EXAMPLES raises it for the long run in
docs/RELIABILITY.md, and PREFIXTUNE_SCHEMATHESIS_REPORT names a file that gets the figures.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance
from serve_helpers import live_server

EXAMPLES = int(os.environ.get("PREFIXTUNE_SCHEMATHESIS_EXAMPLES", "25"))  # per operation and mode
OPERATIONS = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
              ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/{name}"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")}
EXTENSIONS = {"top_k", "min_p", "ignore_eos", "guidance_scale", "guidance_negative", "num_beams", "length_penalty",
              "no_repeat_ngram_size", "early_stopping", "repetition_penalty", "structured_outputs"}
SERVED = ["alpha", "beta", "tiny-base"]
tally: Counter = Counter()


@pytest.fixture(scope="module")
def fuzzed(serve_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-root")
    with live_server(serve_lm, max_batch=4, max_tokens=4, max_body_bytes=32768, adapter_roots=[root],
                     max_model_len=128) as srv:
        started = time.monotonic()
        yield srv
        report = os.environ.get("PREFIXTUNE_SCHEMATHESIS_REPORT")
        if report:
            with open(report, "w") as out:
                json.dump({"examples_per_operation": EXAMPLES, "seconds": round(time.monotonic() - started, 1),
                           **{" ".join(key): n for key, n in sorted(tally.items())},
                           "cases": sum(tally.values())}, out, indent=1)


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    return schemathesis.openapi.from_url(f"{fuzzed.root}/openapi.json")


def _aim(case) -> None:
    """Most generated `model` strings name nothing (a quick 404); send 3 in 4 to a served model instead, chosen
    from the body's bytes (deterministic, unlike hash()), so sampling, beams and guidance code is reached."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and case.path != "/v1/adapters":
        pick = zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 4
        if pick < 3:
            body["model"] = SERVED[pick]


# schemathesis's own pytest plugin fails on this pytest (9: `Function._nodeid`), so each operation's strategy
# drives a plain hypothesis test: the same generation and the same checks.
# Positive cases fit the schema (they reach deep code); negative ones break it and must get a 4xx. Only a body
# can be broken: a string path parameter has no invalid value, so GETs and DELETE are positive only.
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in sorted(OPERATIONS)] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in sorted(OPERATIONS) if m == "POST"]


@pytest.mark.parametrize("method, path, mode", RUNS)
def test_every_operation_answers_within_its_schema(api_schema, fuzzed, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def answers(case):
        _aim(case)
        tally[(method, path, mode.value)] += 1
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, status_code_conformance],
                               base_url=fuzzed.root, timeout=30)

    answers()


def test_openapi_and_docs_are_served_from_the_request_models(fuzzed):
    with httpx.Client(base_url=fuzzed.root, timeout=30) as http:
        spec = http.get("/openapi.json").json()
        docs = http.get("/docs")
    assert {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops} == OPERATIONS
    models = spec["components"]["schemas"]
    for request in ("CompletionRequest", "ChatRequest"):
        assert EXTENSIONS <= set(models[request]["properties"]), request
        assert models[request]["additionalProperties"] is False  # unknown fields are refused, as served
    assert "inputs" in models["CompletionRequest"]["properties"]
    assert not any("422" in op["responses"] for ops in spec["paths"].values() for op in ops.values())
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def test_no_docs_turns_both_off_and_a_key_guards_only_the_api(serve_lm):
    with live_server(serve_lm, docs=False) as srv, srv.http() as http:
        assert http.get("/openapi.json").status_code == 404
        assert http.get("/docs").status_code == 404
    with live_server(serve_lm, api_key="sk-k") as srv, httpx.Client(base_url=srv.root, timeout=30) as http:
        assert http.get("/openapi.json").status_code == 200  # the description holds no adapter names, no data
        assert http.get("/v1/models").status_code == 401
