"""PrefixLM on a tiny random model and a real store: mixed batches, LRU, compatibility, decoding options."""

from __future__ import annotations

import shutil

import pytest
import torch

from prefixtune.adapter_folder import StoreError
from prefixtune.bench.serve_speed import measure_swap_ms
from prefixtune.engine.adapter_cache import AdapterCache, CachedAdapter
from prefixtune.engine.generation import Generation
from prefixtune.engine.lm import PrefixLM
from prefixtune.engine.text import cut_at_stop
from prefixtune.models import model_fingerprint
from prefixtune.prefix.peft_io import WEIGHTS_FILE
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.store import AdapterStore
from prefixtune.testing import ADAPTER_PAIR, make_tiny_model, write_random_store, write_random_adapter as write_adapter


PROMPTS = ["Emotion: joy\nText:", "The weather today is", "Once upon a time, in a land far away,", "Hi"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm):
    labels = ["joy", "anger"]
    return write_random_store(tmp_path_factory.mktemp("store"), tiny_lm, {
        **ADAPTER_PAIR, "c": {"tokens": 2, "seed": 3},
        "emo": {"seed": 4, "template": "Emotion: {label}\nText:", "labels": labels},
        "emo-joy": {"seed": 5, "template": "Text:", "label": "joy", "labels": labels}})


@pytest.fixture
def lm(tiny_lm, store):
    return PrefixLM(tiny_lm, store)


def _alone(lm, prompt, adapter, **kw):
    return lm.generate([prompt], [adapter], **kw)[0]


def test_mixed_batch_equals_per_adapter_runs(lm):
    adapters = ["a", "b", None, "a", "c"]
    prompts = PROMPTS + ["Another prompt of a different length, longer than the others are"]
    mixed = lm.generate(prompts, adapters, max_new_tokens=8)
    assert len(mixed) == len(prompts) and all(isinstance(g, Generation) for g in mixed)
    for prompt, adapter, got in zip(prompts, adapters, mixed):
        alone = _alone(lm, prompt, adapter, max_new_tokens=8)
        assert got.tokens == alone.tokens and got.text == alone.text, adapter
        assert got.adapter == adapter and got.finish_reason == "length" and got.completion_tokens == 8
        assert got.prompt_tokens == len(lm.tokenizer(prompt).input_ids)
    # The adapters must matter, or the comparison above would prove nothing.
    same_prompt = lm.generate([PROMPTS[1]] * 3, ["a", "b", None], max_new_tokens=8)
    assert len({tuple(g.tokens) for g in same_prompt}) == 3


def test_base_rows_are_the_plain_model(lm, tiny_lm):
    ids = tiny_lm.tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    hf = tiny_lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    rows = lm.generate([PROMPTS[0], PROMPTS[2]], ["b", None], max_new_tokens=6, ignore_eos=True)
    assert rows[1].tokens == hf


def test_lru_cache_is_bounded_by_count(tiny_lm, store):
    lm = PrefixLM(tiny_lm, store, cache_size=2)
    first = _alone(lm, PROMPTS[0], "a", max_new_tokens=4)
    for name in ("b", "c"):
        _alone(lm, PROMPTS[0], name, max_new_tokens=2)
        assert len(lm.cache) <= 2
    assert lm.cache.names() == ["b", "c"] and lm.cache.evictions == 1
    again = _alone(lm, PROMPTS[0], "a", max_new_tokens=4)  # reloaded from disk, same result
    assert again.tokens == first.tokens
    assert lm.cache.names() == ["c", "a"] and lm.cache.evictions == 2
    rows = lm.generate(PROMPTS[:3], ["a", "b", "c"], max_new_tokens=2)  # more adapters than slots: still works
    assert [r.adapter for r in rows] == ["a", "b", "c"] and len(lm.cache) == 2


def test_lru_cache_is_bounded_by_bytes(tiny_lm, store):
    one = PrefixLM(tiny_lm, store).adapter("b").nbytes
    lm = PrefixLM(tiny_lm, store, cache_bytes=one + 1)
    for name in ("a", "b", "c", "a"):  # 4, 7, 2 and 4 virtual tokens
        lm.adapter(name)
        assert lm.cache.nbytes <= one + 1
    assert lm.cache.names() == ["c", "a"]  # 6 tokens fit in the bytes of 7
    lm.adapter("b")
    assert lm.cache.names() == ["b"]


def test_adapter_cache_unit():
    def item(n):
        return CachedAdapter(torch.zeros(n), None, 0.0)

    cache = AdapterCache(max_adapters=3, max_bytes=100)
    for i in range(6):
        cache.put(f"x{i}", item(5))  # 20 bytes each
        assert len(cache) <= 3 and cache.nbytes <= 100
    cache.get("x3")  # refresh: x4 is now the least recently used
    cache.put("big", item(21))  # 84 bytes: only big fits
    assert cache.names() == ["big"] and cache.nbytes == 84
    cache.put("small", item(4))  # 84 + 16 bytes fit together
    assert cache.names() == ["big", "small"]
    cache.put("huge", item(50))  # larger than the limit on its own: kept alone
    assert cache.names() == ["huge"]
    assert cache.drop("huge") and cache.nbytes == 0 and len(cache) == 0
    with pytest.raises(ValueError, match="at least 1"):
        AdapterCache(0)

    lru = AdapterCache(max_adapters=3)
    for name in ("x", "y", "z"):
        lru.put(name, item(1))
    assert lru.get("x") is not None  # a hit makes x the most recently used ...
    lru.put("w", item(1))  # ... so y, not x, is evicted
    assert lru.names() == ["z", "x", "w"] and lru.get("y") is None and lru.evictions == 1


def test_retrained_adapter_is_picked_up(tiny_lm, tmp_path):
    lm = PrefixLM(tiny_lm, AdapterStore(tmp_path))
    write_adapter(tmp_path, "x", tiny_lm, seed=10)
    before = _alone(lm, PROMPTS[1], "x", max_new_tokens=6).tokens
    write_adapter(tmp_path, "x", tiny_lm, seed=11)  # atomic overwrite, as training does
    after = _alone(lm, PROMPTS[1], "x", max_new_tokens=6).tokens
    assert after == PrefixLM(tiny_lm, AdapterStore(tmp_path)).generate([PROMPTS[1]], "x", max_new_tokens=6)[0].tokens
    assert after != before
    AdapterStore(tmp_path).remove("x")
    with pytest.raises(StoreError, match="no adapter 'x'"):
        lm.adapter("x")


def test_incompatible_adapter_is_refused(tiny_lm, tmp_path, capsys):
    other = make_tiny_model("llama", seed=1)  # same shapes, other weights
    write_adapter(tmp_path, "foreign", tiny_lm, fingerprint=model_fingerprint(other), base="other-llama")
    gpt2 = make_tiny_model("gpt2")
    write_adapter(tmp_path, "gpt2-adapter", tiny_lm, base="tiny-gpt2", fingerprint=model_fingerprint(gpt2),
                  shape=prefix_shape(gpt2.config))
    lm = PrefixLM(tiny_lm, AdapterStore(tmp_path))
    with pytest.raises(StoreError) as err:
        lm.generate(["x"], ["foreign"], max_new_tokens=1)
    assert "other-llama" in str(err.value) and tiny_lm.name in str(err.value) and "--force" in str(err.value)

    forced = PrefixLM(tiny_lm, AdapterStore(tmp_path), force=True)
    assert forced.generate(["x"], ["foreign"], max_new_tokens=1)[0].completion_tokens == 1
    assert "loading anyway" in capsys.readouterr().err and len(forced.warnings) == 1
    with pytest.raises(StoreError, match="shapes differ") as err:
        forced.generate(["x"], ["gpt2-adapter"], max_new_tokens=1)
    assert "tiny-gpt2" in str(err.value) and tiny_lm.name in str(err.value)


def test_sampling_options(lm):
    kw = dict(max_new_tokens=8, temperature=1.0)
    one = _alone(lm, PROMPTS[1], "a", seed=7, **kw)
    assert _alone(lm, PROMPTS[1], "a", seed=7, **kw).tokens == one.tokens  # seeded = reproducible
    others = {tuple(_alone(lm, PROMPTS[1], "a", seed=s, **kw).tokens) for s in (1, 2, 3)}
    assert len(others | {tuple(one.tokens)}) > 1
    greedy = _alone(lm, PROMPTS[1], "a", max_new_tokens=8)
    assert _alone(lm, PROMPTS[1], "a", top_k=1, seed=3, **kw).tokens == greedy.tokens
    assert _alone(lm, PROMPTS[1], "a", top_p=1e-6, seed=3, **kw).tokens == greedy.tokens
    rows = lm.generate([PROMPTS[1]] * 2, ["a", "a"], seed=[7, 7], **kw)  # per-row seeds, batch-independent
    assert rows[0].tokens == rows[1].tokens == one.tokens
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(["x"], None, top_p=0.0)
    with pytest.raises(ValueError, match="2 prompts but 1 adapters"):
        lm.generate(["x", "y"], ["a"])
    with pytest.raises(ValueError, match="259 positions needed .* has 256"):  # 7 virtual + 2 prompt + 250
        lm.generate(["Hi", "Hi there"], ["a", "b"], max_new_tokens=250)
    assert lm.generate(["Hi", "Hi there"], ["a", "b"], max_new_tokens=1)[1].prompt_tokens == 2


def test_stop_strings_and_eos(lm, monkeypatch):
    full = _alone(lm, PROMPTS[3], "b", max_new_tokens=12)
    assert full.finish_reason == "length"
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), f"need a visible stop string from {full.text!r}"
    cut = _alone(lm, PROMPTS[3], "b", max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert len(cut.tokens) < len(full.tokens)

    first_new = next(i for i in range(1, len(full.tokens)) if full.tokens[i] not in full.tokens[:i])
    monkeypatch.setattr(lm, "eos_ids", lambda: {full.tokens[first_new]})
    ended = _alone(lm, PROMPTS[3], "b", max_new_tokens=12)
    assert ended.finish_reason == "stop" and ended.tokens == full.tokens[:first_new]  # EOS is not output
    assert _alone(lm, PROMPTS[3], "b", max_new_tokens=12, ignore_eos=True).tokens == full.tokens
    assert cut_at_stop("abcSTOPdef", ["x", "STOP", "de"]) == ("abc", True)


def test_render_fills_the_training_template(lm):
    assert lm.render("", "emo", label="joy") == "Emotion: joy\nText:"
    assert lm.render("I", "emo", label="anger") == "Emotion: anger\nText: I"
    assert lm.render("I", "emo-joy", label="joy") == "Text: I"
    assert lm.render("plain", "a") == "plain"
    with pytest.raises(ValueError, match="knows labels joy, anger"):
        lm.render("", "emo", label="fear")
    with pytest.raises(ValueError, match="conditioned on label 'joy'"):
        lm.render("", "emo-joy", label="anger")
    with pytest.raises(ValueError, match="no training template"):
        lm.render("", "a", label="joy")
    with pytest.raises(ValueError, match="base model has none"):
        lm.render("", None, label="joy")
    chat = lm.render("hello", None, chat=True)
    assert "hello" in chat and chat != "hello"
    via_chat = lm.generate(["hello"], ["a"], max_new_tokens=3, chat=True)[0]
    assert via_chat.prompt_tokens == len(lm.tokenizer(chat, add_special_tokens=False).input_ids)


def test_load_by_name_and_swap_time(tiny_model_dir, tiny_lm, tmp_path):
    # ~1 MB of prompt embeddings, the size of a 20-token SmolLM2-135M adapter (20 x 11520 x fp32).
    shape = prefix_shape(tiny_lm.model.config)
    tokens = (1 << 20) // (4 * shape.flat_dim)
    write_adapter(tmp_path, "big", tiny_lm, tokens=tokens)
    lm = PrefixLM.load(str(tiny_model_dir), store=tmp_path, device="cpu", dtype="float32", cache_size=4)
    assert lm.available() == ["big"] and lm.cache.max_adapters == 4
    size = (tmp_path / "big" / WEIGHTS_FILE).stat().st_size
    ms = measure_swap_ms(lm, "big", repeats=7)
    print(f"\nadapter swap: {ms:.2f} ms median for a {size / 1e6:.2f} MB adapter from disk (target < 10 ms)")
    assert ms > 0 and "big" in lm.cache


def test_top_p_keeps_exactly_the_nucleus():
    """Candidates-first nucleus sampling draws only nucleus tokens, also when it spans beyond the candidates."""
    import torch

    from prefixtune.engine.sampling import RowSampler, SamplingParams

    for scale in (3.0, 0.01):  # peaked: small nucleus; flat: nucleus larger than the 1024 candidates
        logits = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * scale
        probs = torch.softmax(logits, -1)
        ordered, order = torch.sort(probs, descending=True)
        nucleus = set(order[(ordered.cumsum(-1) - ordered) < 0.9].tolist())
        sampler = RowSampler(SamplingParams(temperature=1.0, top_p=0.9, seed=0), torch.device("cpu"))
        drawn = {sampler(logits) for _ in range(300)}
        assert drawn <= nucleus
        assert len(drawn) > 1


def test_min_p_draws_only_tokens_above_its_share_of_the_top_one():
    import torch

    from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows

    logits = torch.randn(2000, generator=torch.Generator().manual_seed(2)) * 2.0
    probs = torch.softmax(logits / 0.8, -1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().view(-1).tolist())
    sampler = RowSampler(SamplingParams(temperature=0.8, min_p=0.2, seed=0), torch.device("cpu"))
    drawn = {sampler(logits) for _ in range(300)}
    assert drawn <= allowed and len(drawn) > 1
    # min_p 1 keeps only the likeliest token: sampling becomes greedy.
    sure = RowSampler(SamplingParams(temperature=1.0, min_p=1.0, seed=0), torch.device("cpu"))
    assert {sure(logits) for _ in range(20)} == {int(logits.argmax())}
    # A seeded min-p row draws the same tokens beside rows without it (and with other settings).
    batch = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, min_p=0.05, top_p=0.9, seed=5)
    alone_sampler = RowSampler(params, torch.device("cpu"))
    alone = [alone_sampler(batch[0]) for _ in range(20)]
    mixed = [RowSampler(params, torch.device("cpu"))] + [RowSampler(SamplingParams(temperature=t, seed=s), torch.device(
        "cpu")) for t, s in ((1.0, 1), (0.0, None), (0.7, 2))]
    assert [sample_rows(batch, mixed)[0] for _ in range(20)] == alone
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_p"):
            SamplingParams(temperature=1.0, min_p=bad).validate()


def test_adapter_with_the_legacy_fingerprint_still_loads_and_warns_once(tiny_lm, tmp_path):
    import json
    import warnings

    from prefixtune.adapter_folder import MANIFEST_FILE
    from prefixtune.store import LegacyFingerprintWarning

    folder = write_adapter(tmp_path, "old-adapter", tiny_lm, fingerprint=tiny_lm.legacy_fingerprint)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["fingerprint_version"]  # as written before fingerprints covered every weight
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = PrefixLM(tiny_lm, AdapterStore(tmp_path))
        lm.generate(["x"], ["old-adapter"], max_new_tokens=1)
        PrefixLM(tiny_lm, AdapterStore(tmp_path)).generate(["x"], ["old-adapter"], max_new_tokens=1)
    legacy = [w for w in caught if issubclass(w.category, LegacyFingerprintWarning)]
    assert len(legacy) == 1 and "legacy fingerprint" in str(legacy[0].message)
    # A legacy manifest naming another model's legacy fingerprint is still refused.
    manifest["base_fingerprint"] = "0" * 16
    manifest["name"] = "old-foreign"
    other = tmp_path / "old-foreign"
    shutil.copytree(folder, other)
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="fingerprint 0000000000000000"):
        lm.generate(["x"], ["old-foreign"], max_new_tokens=1)
