"""Penalties, logit_bias and structured outputs over HTTP (server/controls.py) with the real `openai` client
and LangChain's ChatOpenAI against a real server: the same tokens offline generation gives, schema-valid
JSON from `chat.completions.parse`, and 400s naming the field for what cannot run."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from serve_helpers import live_server

from prefixtune.engine.structured import StructuredOutput

PROMPT = "The weather today is"


class Verdict(BaseModel):
    label: Literal["joy", "anger", "fear"]
    score: int = Field(ge=0, le=9)
    certain: bool


@pytest.fixture(scope="module")
def server(serve_lm):
    with live_server(serve_lm, max_batch=8, max_model_len=256) as srv:
        yield srv


def test_penalties_over_http_equal_offline(server):
    token = server.lm.tokenizer(",").input_ids[-1]
    settings = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={token: 6.0})
    want = server.lm.generate([PROMPT], "alpha", max_new_tokens=10, ignore_eos=True, **settings)[0]
    out = server.client().completions.create(
        model="alpha", prompt=PROMPT, max_tokens=10, temperature=0, frequency_penalty=1.5, presence_penalty=0.5,
        logit_bias={str(token): 6.0}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == want.text
    plain = server.lm.generate([PROMPT], "alpha", max_new_tokens=10, ignore_eos=True)[0]
    assert want.tokens != plain.tokens and token in want.tokens
    rep = server.lm.generate([PROMPT], "beta", max_new_tokens=10, ignore_eos=True, repetition_penalty=1.7)[0]
    out = server.client().completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True, "repetition_penalty": 1.7})
    assert out.choices[0].text == rep.text


def test_parse_returns_the_model_beside_free_requests_of_other_adapters(server):
    """`chat.completions.parse` with a pydantic model (sampled) while greedy free requests of other adapters
    run in the same batches: every parse validates, every free request equals its offline run."""
    client = server.client()

    def parse(i: int):
        return client.chat.completions.parse(model=("alpha", "beta", "tiny-base")[i % 3], max_tokens=60,
                                             messages=[{"role": "user", "content": f"Rate message {i}"}],
                                             response_format=Verdict, temperature=1.0, seed=i)

    def free(i: int):
        return client.completions.create(model=("beta", "alpha")[i % 2], prompt=f"{PROMPT} {i}", max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        parsed = [pool.submit(parse, i) for i in range(6)]
        plain = [pool.submit(free, i) for i in range(4)]
        parsed, plain = [f.result() for f in parsed], [f.result() for f in plain]
    for out in parsed:
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(out.choices[0].message.parsed, Verdict)
    for i, text in enumerate(plain):
        want = server.lm.generate([f"{PROMPT} {i}"], ("beta", "alpha")[i % 2], max_new_tokens=12, ignore_eos=True)
        assert text == want[0].text


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"choice": ["sunny", "cloudy with rain"]}}, lambda t: t in ("sunny", "cloudy with rain")),
    ({"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}}, lambda t: re.fullmatch("[0-9]{2}:[0-9]{2}", t)),
    ({"structured_outputs": {"grammar": 'root ::= "a" [b-d] [b-d]? "!"'}}, lambda t: re.fullmatch("a[b-d]{1,2}!", t)),
    ({"structured_outputs": {"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}},
     lambda t: isinstance(json.loads(t), list) and len(json.loads(t)) <= 3),
])
def test_structured_outputs_extension(server, extra, check):
    out = server.client().completions.create(model="alpha", prompt=PROMPT, max_tokens=30, temperature=0,
                                             extra_body=extra)
    text = out.choices[0].text
    assert out.choices[0].finish_reason == "stop" and check(text), text
    spec = extra["structured_outputs"]
    key, value = next(iter(spec.items()))
    offline = StructuredOutput(**{key: json.dumps(value, sort_keys=True) if key == "json" else
                                  tuple(value) if key == "choice" else value})
    assert text == server.lm.generate([PROMPT], "alpha", max_new_tokens=30, structured=offline)[0].text


def test_json_object_streams(server):
    chunks = list(server.client().chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=80, stream=True,
        response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":  # else cut at max_tokens: still a JSON object's start
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_langchain_chat_openai_plain_streamed_and_structured(server):
    llm = ChatOpenAI(model="alpha", base_url=server.url, api_key="none", temperature=0, max_tokens=8,
                     max_retries=0, timeout=30)
    want = server.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                                   temperature=0, max_tokens=8).choices[0].message.content
    assert llm.invoke("Hello").content == want
    assert "".join(chunk.content for chunk in llm.stream("Hello")) == want
    sampled = ChatOpenAI(model="beta", base_url=server.url, api_key="none", temperature=1.0, max_tokens=60,
                         max_retries=0, timeout=30, seed=3)
    assert isinstance(sampled.with_structured_output(Verdict).invoke("Rate this"), Verdict)


@pytest.mark.parametrize("body, param, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", 'invalid JSON schema: Invalid type: objekt'),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema object"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs", "invalid grammar: Rule 'foo' not found"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"structured_outputs": {"choice": ["a"]}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "100"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "out of range"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "0"),
    ({"num_beams": 2, "temperature": 0, "frequency_penalty": 1.0}, "frequency_penalty", "beam search"),
    ({"num_beams": 2, "temperature": 0, "structured_outputs": {"choice": ["a"]}}, "structured_outputs",
     "beam search"),
])
def test_bad_controls_are_400_naming_the_field(server, body, param, needle):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 4, **body})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and needle in error["message"], r.text


def test_engine_process_compiles_and_penalises_as_in_process(serve_lm):
    """As `prefixtune serve` runs by default: the grammar compiles in the engine process (its command thread);
    a bad schema is still a 400 from the front end, before anything reaches the engine."""
    offline = serve_lm.generate([PROMPT], "alpha", max_new_tokens=12, structured=StructuredOutput(
        choice=("sunny", "rainy")), frequency_penalty=1.0)[0].text
    with live_server(serve_lm, engine_process=True, max_batch=4) as srv:
        out = srv.client().completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0,
                                              frequency_penalty=1.0,
                                              extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
        assert out.choices[0].text == offline and out.choices[0].finish_reason == "stop"
        parsed = srv.client().chat.completions.parse(model="beta", response_format=Verdict, max_tokens=60,
                                                     messages=[{"role": "user", "content": "Rate"}], seed=1)
        assert isinstance(parsed.choices[0].message.parsed, Verdict)
        with srv.http() as http:
            r = http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2,
                                                   "structured_outputs": {"regex": "(("}})
            assert r.status_code == 400 and "invalid regex" in r.json()["error"]["message"], r.text
