"""Beam search over HTTP (extension fields, server/beams.py): the real `openai` client against a real server
gives the beams offline search gives, alone or beside other adapters' greedy requests; bad settings are 400s."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import httpx
from serve_helpers import gated_model, live_server, slow_model, wait_for

from prefixtune.testing import write_random_adapter

PROMPT = "The cat sat on the mat and"
BEAMS = dict(num_beams=4, length_penalty=0.7, no_repeat_ngram_size=2)


@pytest.fixture(scope="module")
def server(sharp_lm, tmp_path_factory):
    folder = write_random_adapter(tmp_path_factory.mktemp("task"), "e2e", sharp_lm.loaded, tokens=5, seed=7,
                                  scale=10.0, template="Record: {mr}\nSentence:", fields=["mr"])
    sharp_lm.register("e2e", folder)
    with live_server(sharp_lm, max_batch=8, max_model_len=128, max_num_beams=6) as srv:
        yield srv


def _n_best(lm, prompt, adapter, n, max_new_tokens=8, chat=False, **kw):
    """Offline search's n best texts (PrefixLM.generate's beams)."""
    hyps = lm.generate([prompt], adapter, max_new_tokens=max_new_tokens, num_return_sequences=n, chat=chat,
                       **{**BEAMS, **kw})
    return [lm.tokenizer.decode(h.tokens, skip_special_tokens=True) for h in hyps], [len(h.tokens) for h in hyps]


@pytest.mark.parametrize("stream", [False, True])
def test_beams_over_http_equal_offline_search(server, stream):
    client = server.client()
    texts, lengths = _n_best(server.lm, PROMPT, "alpha", 3)
    top = server.lm.generate([PROMPT], "alpha", max_new_tokens=8, **BEAMS)[0]
    assert texts[0] == top.text and top.text != server.lm.generate([PROMPT], "alpha", max_new_tokens=8)[0].text
    kwargs = dict(model="alpha", prompt=PROMPT, max_tokens=8, n=3, extra_body=BEAMS)
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        got = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
        usage = chunks[-1].usage
    else:
        out = client.completions.create(**kwargs)
        got, usage = [c.text for c in sorted(out.choices, key=lambda c: c.index)], out.usage
    assert got == texts and len(set(got)) == 3
    assert usage.completion_tokens == sum(lengths)
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "How are you?"}],
                                          max_tokens=6, n=2, extra_body=dict(BEAMS, early_stopping=True))
    expected, _ = _n_best(server.lm, "How are you?", "beta", 2, 6, chat=True, early_stopping=True)
    assert [c.message.content for c in chat.choices] == expected


def test_beam_request_beside_other_adapters_greedy_requests(server):
    client = server.client()
    texts, _ = _n_best(server.lm, PROMPT, "alpha", 2, 10)
    others = [("beta", "The weather was"), ("tiny-base", "Once upon a time"), ("alpha", "Story number 3")]
    alone = [server.lm.generate([p], None if m == "tiny-base" else m, max_new_tokens=12)[0].text for m, p in others]
    stop = texts[0][3:6]  # a stop string inside the best beam: it ends at the stop, as offline generate cuts it

    def beams():
        return [c.text for c in client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, n=2,
                                                          extra_body=BEAMS).choices]

    def greedy(job):
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0).choices[0].text

    before = server.scheduler.stats.max_batch_size
    with gated_model(server.lm) as gate, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(greedy, others[0]), pool.submit(beams)] + [pool.submit(greedy, j) for j in others[1:]]
        wait_for(lambda: server.scheduler.in_flight == 4, what="four requests in flight")
        gate.set()
        results = [f.result(timeout=60) for f in futures]
    assert results[1] == texts and [results[0], *results[2:]] == alone
    assert server.scheduler.stats.max_batch_size >= max(before, 5)  # the four beams shared steps with others
    cut = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, n=2, stop=[stop], extra_body=BEAMS)
    offline = server.lm.generate([PROMPT], "alpha", max_new_tokens=10, stop=[stop], **BEAMS)[0]
    assert cut.choices[0].text == offline.text == texts[0][:texts[0].find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert server.scheduler.in_flight == 0 and len(server.scheduler.runner) == 0


def test_client_disconnect_frees_the_beam_group(server):
    stats = server.scheduler.stats
    before = stats.finished["cancelled"]
    with slow_model(server.lm, 0.02), httpx.Client(base_url=server.root, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client hangs up while the beams decode
            http.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 100, "n": 2,
                                               "num_beams": 4})
        wait_for(lambda: stats.finished["cancelled"] == before + 1, what="the beam group to be cancelled")
    wait_for(lambda: server.scheduler.in_flight == 0 and len(server.scheduler.runner) == 0, what="rows freed")


def test_task_inputs_with_beams(server):
    inputs = {"mr": "name[The Eagle], food[French]"}
    prompt = server.lm.render("", "e2e", inputs=inputs)
    offline = server.lm.generate([prompt], "e2e", max_new_tokens=8, **BEAMS)[0]
    assert offline.text != server.lm.generate([prompt], "e2e", max_new_tokens=8)[0].text
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": "e2e", "prompt": "", "inputs": inputs, "max_tokens": 8,
                                               "n": 2, **BEAMS})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and choices[0]["text"] == offline.text
    assert choices[1]["text"] == _n_best(server.lm, prompt, "e2e", 2)[0][1]


@pytest.mark.parametrize("body, param", [
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 7}, "num_beams"),  # over max_num_beams
    ({"num_beams": 2, "n": 3}, "n"),
    ({"num_beams": 2, "temperature": 0.7}, "temperature"),
    ({"num_beams": 2, "top_p": 0.5}, "top_p"),
    ({"num_beams": 2, "top_k": 5}, "top_k"),
    ({"num_beams": 2, "min_p": 0.1}, "min_p"),
    ({"num_beams": 2, "guidance_scale": 2.0}, "guidance_scale"),
    ({"num_beams": 2, "ignore_eos": True}, "ignore_eos"),
    ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),  # a beam field without beams
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"num_beams": 2, "length_penalty": 1e308}, "length_penalty"),  # length ** 1e308 would overflow
    ({"num_beams": 2, "no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"num_beams": "4"}, "num_beams"),
])
def test_bad_beam_settings_are_400_naming_the_field(server, body, param):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        if body.get("num_beams") == 7:
            assert "max_num_beams" in r.json()["error"]["message"]
        messages = [{"role": "user", "content": "hi"}]
        chat = http.post("/v1/chat/completions", json={"model": "alpha", "messages": messages, "max_tokens": 2, **body})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == param, chat.text


def test_beams_over_max_batch_are_refused_naming_it(sharp_lm):
    with live_server(sharp_lm, max_batch=3) as srv, srv.http() as http:
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2, "num_beams": 4})
        assert r.status_code == 400 and "max_batch" in r.json()["error"]["message"], r.text
