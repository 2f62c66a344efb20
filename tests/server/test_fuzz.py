"""Property-based fuzzing of the HTTP API (hypothesis): whatever a client sends, the answer is a 2xx or a 4xx
with an OpenAI-style JSON error, never a 5xx, and the server stays healthy. Bounded: runs in seconds."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import live_server

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "seed", "stop", "stream", "stream_options", "ignore_eos", "user", "logprobs", "echo", "best_of",
          "top_logprobs", "add_special_tokens", "add_generation_prompt", "return_token_strs", "tokens",
          "guidance_scale", "guidance_negative", "presence_penalty", "logit_bias", "response_format", "name", "path",
          "frequency_penalty", "repetition_penalty", "structured_outputs", "json_schema", "schema", "regex", "choice",
          "num_beams", "length_penalty", "no_repeat_ngram_size", "early_stopping"]
NAMES = ["alpha", "beta", "tiny-base", "none", "", "../alpha", "/etc/passwd", "..", ".", "a/b", "alpha\x00",
         "\u00e9t\u00e9", "x" * 300, "\ud800", "NONE"]
EXAMPLES = 45  # per test; three tests keep the file well under a minute on a busy 2-core machine

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(NAMES), st.just("x" * 5000),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS + ["role", "content", "type", "text"]),
                                                 inner, max_size=4)), max_leaves=12)
VALID = {"model": "alpha", "prompt": "Tell me", "max_tokens": 3, "temperature": 0}
VALID_CHAT = {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def mutated(valid: dict):
    """A valid body with some fields replaced, removed or added: mostly-valid requests reach deep code."""
    return st.tuples(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
                     st.lists(st.sampled_from(list(valid)), max_size=2)).map(
        lambda change: {**{k: v for k, v in valid.items() if k not in change[1]}, **change[0]})


@pytest.fixture(scope="module")
def server(serve_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-root")
    with live_server(serve_lm, max_batch=4, max_tokens=4, max_body_bytes=32768, adapter_roots=[root],
                     max_model_len=128) as srv, srv.http() as http:
        srv.fuzz_http = http
        yield srv


def _send(server, path: str, body) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()  # \\ud800 stays escaped
    r = server.fuzz_http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"], r.text
    elif "text/event-stream" in r.headers.get("content-type", ""):
        assert '"server_error"' not in r.text, r.text[:300]
    assert server.fuzz_http.get("/health").status_code == 200


_settings = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_settings
@given(body=st.one_of(mutated(VALID), json_values, st.binary(max_size=64)))
def test_completions_never_5xx(server, body):
    _send(server, "/v1/completions", body)


@_settings
@given(body=st.one_of(mutated(VALID_CHAT), json_values))
def test_chat_never_5xx(server, body):
    _send(server, "/v1/chat/completions", body)


@_settings
@given(body=st.one_of(st.fixed_dictionaries({"name": st.sampled_from(NAMES) | st.text(max_size=20)},
                                            optional={"path": st.sampled_from(NAMES + ["/", "/tmp", "~"])}),
                      json_values))
def test_admin_load_never_5xx(server, body):
    _send(server, "/v1/adapters", body)


@_settings
@given(body=st.one_of(mutated({"model": "alpha", "prompt": "Tell me", "return_token_strs": True}),
                      mutated({"tokens": [1, 2, 3]}), json_values))
def test_tokenize_never_5xx(server, body):
    _send(server, "/tokenize", body)
    _send(server, "/detokenize", body)
