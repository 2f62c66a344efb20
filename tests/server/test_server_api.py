"""The OpenAI-compatible API through the real `openai` client against a real server on a loopback port."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import API_KEY, gated_model, live_server, wait_for

PROMPTS = {"alpha": "I feel so happy today because", "beta": "The weather was", "tiny-base": "Once upon a time"}


@pytest.fixture(scope="module")
def server(serve_lm):
    with live_server(serve_lm, api_key=API_KEY, max_batch=8, max_model_len=128) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _offline(lm, prompt, model, n=12, **kw):
    adapter = None if model == "tiny-base" else model
    return lm.generate([prompt], adapter, max_new_tokens=n, temperature=0.0, **kw)[0]


def test_models_lists_base_and_every_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-base", "alpha", "beta"}
    assert client.models.retrieve("beta").id == "beta"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_offline_generate(server, client, stream):
    offline = {m: _offline(server.lm, p, m) for m, p in PROMPTS.items()}
    assert len({g.text for g in offline.values()}) == 3, "adapters must change greedy output (else vacuous)"
    for model, prompt in PROMPTS.items():
        if stream:
            chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
            assert all(c.model == model and c.object == "text_completion" for c in chunks)
        else:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            text, finish, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
        g = offline[model]
        assert (text, finish) == (g.text, g.finish_reason), model
        assert (usage.prompt_tokens, usage.completion_tokens) == (g.prompt_tokens, len(g.tokens))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_chat_uses_the_chat_template_and_matches_offline(server, client, stream):
    question = "How are you?"
    g = _offline(server.lm, question, "beta", n=10, chat=True)
    kwargs = dict(model="beta", messages=[{"role": "user", "content": question}], max_tokens=10, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        out = client.chat.completions.create(**kwargs)
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == len(g.tokens)
    assert (text, finish) == (g.text, g.finish_reason)


def test_concurrent_requests_of_two_adapters_share_a_batch(server, client):
    jobs = [("alpha" if i % 2 == 0 else "beta", f"Story number {i} begins") for i in range(6)]
    offline = [_offline(server.lm, p, m, n=16) for m, p in jobs]
    stats = server.scheduler.stats
    before_prefills = stats.prefills

    def call(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    # Hold the model until all six requests are in: the first rows prefill (held), the rest queue and join the
    # running batch on the next iteration, so adapters of 4 and 7 virtual tokens decode in the same steps.
    with gated_model(server.lm) as gate, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, job) for job in jobs]
        wait_for(lambda: server.scheduler.in_flight == 6, what="six requests in flight")
        gate.set()
        texts = [f.result(timeout=60) for f in futures]
    assert texts == [g.text for g in offline]
    assert stats.max_batch_size == 6 and stats.max_adapters_in_batch >= 2
    assert stats.prefills - before_prefills >= 2  # some rows joined a batch that was already running


def test_n_choices_and_seed(client):
    kwargs = dict(model="alpha", prompt="Pick a word:", max_tokens=6, temperature=1.0, n=3, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]  # the seed reproduces
    assert len(set(texts)) > 1  # but each choice samples its own stream
    assert first.usage.completion_tokens == 18


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_cut_and_never_leaks_while_streaming(server, client, stream):
    full = _offline(server.lm, PROMPTS["alpha"], "alpha").text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    assert _offline(server.lm, PROMPTS["alpha"], "alpha", stop=[stop]).text == expected
    kwargs = dict(model="alpha", prompt=PROMPTS["alpha"], max_tokens=12, temperature=0, stop=[stop])
    if stream:
        pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
        text = "".join(pieces)
    else:
        out = client.completions.create(**kwargs)
        text = out.choices[0].text
        assert out.choices[0].finish_reason == "stop"
    assert text == expected


def test_unknown_model_is_404_in_openai_format(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="../alpha", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=500), "max_tokens"),  # beyond max_model_len 128
    (dict(n=0), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(logprobs=21), "logprobs"),
    (dict(extra_body={"max_token": 3}), "max_token"),  # a typo is named, not ignored
])
def test_invalid_fields_are_400_naming_the_field(client, kwargs, field):
    kwargs = {"max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt="hi", **kwargs)
    assert err.value.body["param"] == field, err.value.body


def test_chat_invalid_message_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.body["param"] == "messages"


def test_api_key_is_required_everywhere_but_health(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with server.http(api_key="wrong") as http:
        assert http.get("/health").status_code == 200
        for method, path in [("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("DELETE", "/v1/adapters/alpha")]:
            assert http.request(method, path).status_code == 401, path
    with server.http() as http:
        assert http.get("/metrics").status_code == 200


def test_metrics_parse_and_count(server, client):
    client.completions.create(model="beta", prompt="count me", max_tokens=2, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody", prompt="count me", max_tokens=2)
    with server.http() as http:
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("prefixtune_requests", "prefixtune_queue_depth", "prefixtune_batch_size",
                 "prefixtune_tokens_per_second", "prefixtune_time_to_first_token_seconds",
                 "prefixtune_loaded_adapters", "prefixtune_generated_tokens"):
        assert name in families, name
    requests = {(s.labels.get("adapter"), s.labels.get("status")): s.value
                for s in families["prefixtune_requests"].samples if s.name == "prefixtune_requests_total"}
    assert requests[("beta", "200")] >= 1
    assert requests[("-", "404")] >= 1  # unknown model names do not become labels
    loaded = families["prefixtune_loaded_adapters"].samples[0].value
    assert loaded >= 1
    ttft = {s.name: s.value for s in families["prefixtune_time_to_first_token_seconds"].samples
            if s.labels.get("adapter") == "beta"}
    assert ttft["prefixtune_time_to_first_token_seconds_count"] >= 1
