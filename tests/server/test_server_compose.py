"""Composed models ("a+b") through the real `openai` client against a real server, in process and with the engine
in its own process: both compose modes match offline generation while other requests share the batch, the
per-adapter weights extension, and 4xx answers naming the problem."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_helpers import live_server

from prefixtune.engine.generation import candidate_seeds
from prefixtune.engine.lm import PrefixLM
from prefixtune.fingerprint import model_fingerprint
from prefixtune.models import load_base_model
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.testing import make_tiny_model, write_random_adapter

PROMPT = "I feel so happy today because"
COMPOSED = "joy+sports"


@pytest.fixture(scope="module")
def compose_lm(tmp_path_factory, tiny_model_dir):
    loaded = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    root = tmp_path_factory.mktemp("compose-serve")
    write_random_adapter(root, "emotion-all", loaded, tokens=3, seed=1, scale=10.0)
    write_random_adapter(root, "topic-all", loaded, tokens=5, seed=2, scale=10.0)
    write_random_adapter(root, "joy", loaded, tokens=4, seed=3, scale=10.0,
                         guidance={"scale": 2.0, "negative": "emotion-all"})
    write_random_adapter(root, "sports", loaded, tokens=6, seed=4, scale=10.0,
                         guidance={"scale": 1.5, "negative": "topic-all"})
    gpt2 = make_tiny_model("gpt2")
    write_random_adapter(root, "gpt2-style", loaded, base="tiny-gpt2", fingerprint=model_fingerprint(gpt2),
                         shape=prefix_shape(gpt2.config))
    return PrefixLM(loaded, root)


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def server(request, compose_lm):
    with live_server(compose_lm, engine_process=request.param, max_batch=16, max_model_len=128,
                     max_compose=2) as srv:
        yield srv


def _offline(lm, mode, weights=None):
    return lm.generate([PROMPT], COMPOSED, max_new_tokens=10, temperature=0.0, compose_mode=mode,
                       compose_weights=weights)[0]


@pytest.mark.parametrize("mode", ["guidance", "concat"])
def test_composed_model_matches_offline_in_a_mixed_batch(server, compose_lm, mode):
    client = server.client()
    expected = _offline(compose_lm, mode)
    assert expected.text != compose_lm.generate([PROMPT], "joy", max_new_tokens=10)[0].text, "vacuous"

    def composed(_):
        out = client.completions.create(model=COMPOSED, prompt=PROMPT, max_tokens=10, temperature=0,
                                        extra_body={"compose_mode": mode})
        return out.model, out.choices[0].text, out.usage.completion_tokens

    def other(i):
        model = ("joy", "sports", "tiny-base")[i % 3]
        return client.completions.create(model=model, prompt="The weather", max_tokens=12, temperature=0.8,
                                         seed=i).choices[0].text

    with ThreadPoolExecutor(8) as pool:  # composed rows and plain/guided rows of others in the same steps
        others = [pool.submit(other, i) for i in range(6)]
        got = list(pool.map(composed, range(3)))
        [f.result() for f in others]
    assert got == [(COMPOSED, expected.text, len(expected.tokens))] * 3


def test_per_adapter_weights_extension(server, compose_lm):
    client = server.client()
    out = client.completions.create(model=COMPOSED, prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"compose_weights": [3.0, 0.5]})
    expected = _offline(compose_lm, "guidance", [3.0, 0.5])
    assert out.choices[0].text == expected.text
    assert expected.text != _offline(compose_lm, "guidance", [0.5, 3.0]).text
    chat = client.chat.completions.create(model=COMPOSED, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.model == COMPOSED and chat.choices[0].message.content is not None


def test_best_of_returns_the_samples_with_the_most_evidence(server, compose_lm):
    """best_of=3: the server draws the seeds offline best_of does and returns the n whose evidence is highest,
    best first; usage counts every sample drawn."""
    client = server.client()
    for n in (1, 2):
        seeds = candidate_seeds(7, n, 3)
        drawn = compose_lm.generate([PROMPT] * 3, COMPOSED, max_new_tokens=8, temperature=1.0, seed=seeds)
        ranked = sorted(drawn, key=lambda g: g.score, reverse=True)
        assert len({g.text for g in drawn}) == 3, "vacuous: the samples must differ"
        out = client.completions.create(model=COMPOSED, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7,
                                        n=n, best_of=3)
        assert [c.text for c in out.choices] == [g.text for g in ranked[:n]]
        offline = compose_lm.generate([PROMPT], COMPOSED, max_new_tokens=8, temperature=1.0, seed=7,
                                      num_samples=n, best_of=3)
        assert [c.text for c in out.choices] == [g.text for g in offline]
        assert [c.index for c in out.choices] == list(range(n))
        assert out.usage.completion_tokens == sum(len(g.tokens) for g in drawn)


@pytest.mark.parametrize("model, kw, words", [
    ("joy", {}, "best_of ranks samples by a composed adapter's evidence"),
    (COMPOSED, {"extra_body": {"compose_mode": "concat"}}, "compose_mode 'concat' has none"),
    (COMPOSED, {"stream": True}, "stream"),
    (COMPOSED, {"n": 3}, "must be >= n"),
])
def test_best_of_is_refused_where_nothing_ranks_the_samples(server, model, kw, words):
    with pytest.raises(openai.APIStatusError) as err:
        server.client().completions.create(model=model, prompt=PROMPT, max_tokens=4, best_of=2, **kw)
    assert err.value.status_code == 400 and words in err.value.message
    assert err.value.body["param"] == "best_of"


@pytest.mark.parametrize("model, extra, status, words", [
    ("joy+nope", {}, 404, "`nope` does not exist"),
    ("joy+sports+emotion-all", {}, 400, "max_compose"),
    ("joy+joy", {}, 400, "twice"),
    ("joy+tiny-base", {}, 400, "base model"),
    ("joy+gpt2-style", {}, 400, "gpt2-style"),
    ("joy+gpt2-style", {"compose_mode": "concat"}, 400, "gpt2-style"),
    (COMPOSED, {"compose_weights": [1.0]}, 400, "one weight per adapter"),
    (COMPOSED, {"compose_weights": [1.0, 1.0], "compose_mode": "concat"}, 400, "guidance_scale"),
    (COMPOSED, {"compose_mode": "stack"}, 400, "compose_mode"),
    ("joy", {"compose_mode": "concat"}, 400, "single model"),
    (COMPOSED, {"guidance_negative": "gone"}, 400, "gone"),
])
def test_bad_compositions_are_4xx_naming_the_problem(server, model, extra, status, words):
    with pytest.raises(openai.APIStatusError) as err:
        server.client().completions.create(model=model, prompt=PROMPT, max_tokens=4, extra_body=extra)
    assert err.value.status_code == status
    assert words in err.value.message
