"""logprobs, echo (scoring), chat logprobs, /tokenize, /detokenize and the /v1/models extension, through the real
`openai` client and httpx against a real server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_helpers import live_server

from prefixtune.testing import forward_logprobs

TEXTS = {"alpha": "I feel so happy today because the sun", "beta": "The weather was grey and", None: "Once upon"}


@pytest.fixture(scope="module")
def server(serve_lm):
    with live_server(serve_lm, max_batch=8, max_model_len=128) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _model(adapter):
    return adapter or "tiny-base"


def _echo(client, adapter, text, **kw):
    return client.completions.create(model=_model(adapter), prompt=text, max_tokens=0, echo=True, logprobs=2,
                                     temperature=0, **kw).choices[0]


def test_echo_scores_equal_score_and_a_plain_forward_in_a_mixed_batch(server, client, tiny_model_dir):
    lm = server.lm
    with ThreadPoolExecutor(6) as pool:  # scoring rows of every model beside generating rows, in shared steps
        generating = [pool.submit(client.completions.create, model=_model(a), prompt=t, max_tokens=16,
                                  temperature=0) for a, t in TEXTS.items()]
        echoed = {a: pool.submit(_echo, client, a, t) for a, t in TEXTS.items()}
        echoed = {a: f.result() for a, f in echoed.items()}
        assert all(f.result().choices[0].finish_reason for f in generating)
    for adapter, text in TEXTS.items():
        choice, ids = echoed[adapter], lm.tokenizer(text).input_ids
        lp = choice.logprobs
        assert choice.text == text and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
        assert "".join(lp.tokens) == text and lp.text_offset[0] == 0
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
        offline = lm.score([text], [adapter])[0].logprobs[1:]
        folder = None if adapter is None else lm.store.folder(adapter)
        plain = forward_logprobs(tiny_model_dir, ids, folder)
        assert lp.token_logprobs[1:] == pytest.approx(offline, abs=1e-4)
        assert lp.token_logprobs[1:] == pytest.approx(plain, abs=1e-4)
        for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert top[token] == pytest.approx(value) and 2 <= len(top) <= 3  # top 2 and the token itself
    assert echoed["alpha"].logprobs.token_logprobs[1:] != pytest.approx(
        _echo(client, "beta", TEXTS["alpha"]).logprobs.token_logprobs[1:], abs=1e-2)  # the adapter matters


def test_completion_logprobs_follow_the_generated_tokens(server, client):
    lm = server.lm
    want = lm.generate([TEXTS["beta"]], "beta", max_new_tokens=8, ignore_eos=True, logprobs=3)[0]
    for stream in (False, True):
        kw = dict(model="beta", prompt=TEXTS["beta"], max_tokens=8, temperature=0, logprobs=3,
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
            tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
            values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
            offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
            text = "".join(c.text for c in chunks)
        else:
            choice = client.completions.create(**kw).choices[0]
            tokens, values = choice.logprobs.tokens, choice.logprobs.token_logprobs
            offsets, text = choice.logprobs.text_offset, choice.text
        assert tokens == [lm.tokenizer.decode([t]) for t in want.tokens] and text == want.text
        assert values == pytest.approx([lp for lp, _ in want.logprobs], abs=1e-4)
        assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


def test_echo_with_generation_and_stream(client):
    text = TEXTS["alpha"]
    whole = client.completions.create(model="alpha", prompt=text, max_tokens=4, echo=True, logprobs=0,
                                      temperature=0, extra_body={"ignore_eos": True}).choices[0]
    assert whole.text.startswith(text) and len(whole.logprobs.tokens) == len(whole.logprobs.token_logprobs)
    assert whole.logprobs.text_offset[-4] == len(text)  # generated tokens continue after the echoed prompt
    chunks = [c.choices[0] for c in client.completions.create(model="alpha", prompt=text, max_tokens=4, echo=True,
                                                              logprobs=0, temperature=0, stream=True,
                                                              extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    plain = client.completions.create(model="alpha", prompt=text, max_tokens=0, echo=True).choices[0]
    assert plain.text == text and plain.logprobs is None  # echo alone: the text, no numbers


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(server, client, stream):
    kw = dict(model="alpha", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=2)
    if stream:
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        content = [item for c in chunks if c.logprobs and c.logprobs.content for item in c.logprobs.content]
        text = "".join(c.delta.content or "" for c in chunks)
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        content, text = choice.logprobs.content, choice.message.content
    assert content and "".join(item.token for item in content).startswith(text)
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes) == item.token.encode()
    none = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0]
    assert none.logprobs is None


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": 1, "num_beams": 2}, "logprobs"),
])
def test_bad_logprob_requests_are_400(server, body, param):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": "alpha", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_top_logprobs_needs_logprobs(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)


def test_tokenize_and_detokenize(server):
    lm = server.lm
    with server.http() as http:
        r = http.post("/tokenize", json={"model": "alpha", "prompt": TEXTS["alpha"], "return_token_strs": True})
        body = r.json()
        assert r.status_code == 200 and body["tokens"] == lm.tokenizer(TEXTS["alpha"]).input_ids
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 128
        assert "".join(body["token_strs"]) == TEXTS["alpha"]
        back = http.post("/detokenize", json={"model": "alpha", "tokens": body["tokens"]}).json()
        assert back == {"prompt": TEXTS["alpha"]}
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        want = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        assert chat["tokens"] == list(getattr(want, "input_ids", want)) and chat["token_strs"] is None
        assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert http.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 400
        r = http.post("/detokenize", json={"tokens": [len(lm.tokenizer) + 5]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_models_say_which_adapter_is_which(server, client):
    cards = {m.id: m.model_extra["prefixtune"] for m in client.models.list().data}
    assert cards["tiny-base"] == {"kind": "base", "adapters": 2}
    for name in ("alpha", "beta"):
        manifest = server.lm.manifest(name)
        assert cards[name]["kind"] == "prefix" and cards[name]["base_model"] == manifest.base_model
        assert cards[name]["template"] == "Emotion: {label}\nText:"
        assert cards[name]["num_virtual_tokens"] == {"alpha": 4, "beta": 7}[name]
    assert client.models.retrieve("beta").model_extra["prefixtune"] == cards["beta"]


def test_echo_through_the_engine_process(serve_lm, tiny_model_dir):
    """The engine process sends log-probabilities over its pipe (engine/core.py) as the in-process engine does."""
    with live_server(serve_lm, engine_process=True) as srv:
        choice = _echo(srv.client(), "beta", TEXTS["beta"])
    ids = serve_lm.tokenizer(TEXTS["beta"]).input_ids
    plain = forward_logprobs(tiny_model_dir, ids, serve_lm.store.folder("beta"))
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(plain, abs=1e-4)


def test_an_eos_ending_is_scored(server, client):
    """lm-eval's local-completions reads echo + max_tokens 1 as prompt + one generated entry ([ctxlen:-1]): an EOS
    that ends the row keeps its entry (not its text), as vLLM's."""
    text = TEXTS["beta"]
    first = server.lm.generate([text], "beta", max_new_tokens=1, ignore_eos=True)[0].tokens[0]
    server.scheduler.eos_ids.add(first)  # the greedy next token now ends the row
    try:
        choice = client.completions.create(model="beta", prompt=text, max_tokens=1, echo=True, logprobs=1,
                                           temperature=0).choices[0]
    finally:
        server.scheduler.eos_ids.discard(first)
    n = len(server.lm.tokenizer(text).input_ids)
    assert choice.finish_reason == "stop" and choice.text == text
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == n + 1
    assert choice.logprobs.tokens[-1] == server.lm.tokenizer.decode([first])
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(max(choice.logprobs.top_logprobs[-1].values()))
