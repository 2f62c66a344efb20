"""Guidance in offline generation: a guided row runs with an unconditioned companion row in the same batch."""

from __future__ import annotations

import pytest
import torch

from prefixtune.engine.guidance import guided_logits, layout_mask
from prefixtune.engine.lm import PrefixLM
from prefixtune.prefix.model import PrefixModel
from prefixtune.testing import ADAPTER_PAIR, write_random_store

PROMPTS = ["The weather today is", "Hi", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_lm):
    """The engine tests' pair, a negative "fam", and two adapters recommending guidance: against "fam", and
    against a name the store lacks."""
    store = write_random_store(tmp_path_factory.mktemp("guided-store"), tiny_lm, {
        **ADAPTER_PAIR, "fam": {"tokens": 3, "seed": 3},
        "rec": {"tokens": 4, "seed": 4, "guidance": {"scale": 2.5, "negative": "fam"}},
        "orphan": {"tokens": 4, "seed": 5, "guidance": {"scale": 3.0, "negative": "gone"}}})
    return PrefixLM(tiny_lm, store)


def _reference(lm, prompt, adapter, negative, scale, steps):
    """Guided greedy decoding from two separate full forwards per step (no cache, no batching)."""
    model = PrefixModel(lm.model)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    kv = lm.adapter(adapter).kv
    neg = None if negative is None else lm.adapter(negative).kv
    out = []
    for _ in range(steps):
        mask = torch.ones_like(ids)
        cond = model(ids, mask, prefixes=[kv]).logits[:, -1]
        uncond = model(ids, mask, prefixes=[neg]).logits[:, -1]
        token = int(guided_logits(cond, uncond, scale, eos_ids=lm.eos_ids()).argmax(-1))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("negative", [None, "fam"])
def test_guided_greedy_equals_two_separate_forwards(lm, negative):
    got = lm.generate(PROMPTS[:2], ["a", "b"], max_new_tokens=6, guidance_scale=3.0,
                      guidance_negative=negative or "none", ignore_eos=True)
    for prompt, adapter, row in zip(PROMPTS, ["a", "b"], got):
        assert row.tokens == _reference(lm, prompt, adapter, negative, 3.0, 6)


def test_guidance_changes_output_and_scale_one_is_off(lm):
    plain = lm.generate(PROMPTS, ["a", "b", "a"], max_new_tokens=8, ignore_eos=True)
    off = lm.generate(PROMPTS, ["a", "b", "a"], max_new_tokens=8, ignore_eos=True, guidance_scale=1.0)
    guided = lm.generate(PROMPTS, ["a", "b", "a"], max_new_tokens=8, ignore_eos=True, guidance_scale=4.0)
    assert [g.tokens for g in off] == [g.tokens for g in plain]
    assert [g.tokens for g in guided] != [g.tokens for g in plain]


def test_guided_row_in_a_mixed_batch_equals_it_alone(lm):
    # Greedy: the random tiny model's next-token distribution is nearly flat over 49k tokens, so a sampled
    # draw can flip on the ~1e-6 float noise that batch shapes cause; the argmax cannot.
    adapters = ["a", None, "b", "a"]
    kw = dict(max_new_tokens=10, guidance_scale=2.0, guidance_negative="fam", ignore_eos=True)
    mixed = lm.generate(PROMPTS + ["x"], adapters, **kw)
    for prompt, adapter, row in zip(PROMPTS + ["x"], adapters, mixed):
        alone = lm.generate([prompt], [adapter], **kw)[0]
        assert alone.tokens == row.tokens and alone.finish_reason == row.finish_reason
    # A base-model row has nothing to be guided against: it is the plain base model.
    assert mixed[1].tokens == lm.generate([PROMPTS[1]], [None], max_new_tokens=10, ignore_eos=True)[0].tokens
    # Rows that finish at different steps leave the batch with their companions, the others go on unchanged.
    stop = mixed[0].text[len(lm.tokenizer.decode(mixed[0].tokens[:2])):][:3]
    short = lm.generate(PROMPTS + ["x"], adapters, stop=[stop], **kw)
    assert short[0].finish_reason == "stop" and len(short[0].tokens) < 10
    for before, after in zip(mixed[1:], short[1:]):
        if stop not in before.text:
            assert after.tokens == before.tokens


def test_manifest_recommendation_is_the_default(lm):
    assert lm.guidance("rec") == (2.5, "fam")
    assert lm.guidance("rec", 1.0) == (1.0, None)  # the caller's scale wins
    assert lm.guidance("rec", 4.0) == (4.0, "fam")  # field by field: the recommended negative stays
    assert lm.guidance("rec", 4.0, "none") == (4.0, None)  # "none" is the base model
    assert lm.guidance("a") == (1.0, None)
    default = lm.generate([PROMPTS[0]], ["rec"], max_new_tokens=6, ignore_eos=True)
    explicit = lm.generate([PROMPTS[0]], ["rec"], max_new_tokens=6, ignore_eos=True, guidance_scale=2.5,
                           guidance_negative="fam")
    assert default[0].tokens == explicit[0].tokens
    # Copied without its family's adapter, an adapter generates unguided (one warning), not an error.
    assert lm.guidance("orphan") == (1.0, None)
    assert lm.guidance("orphan") == (1.0, None)
    assert sum("'gone'" in w and "without guidance" in w for w in lm.warnings) == 1
    assert lm.guidance("orphan", 2.0) == (2.0, None)  # a scale the caller gives runs against the base model
    assert lm.generate([PROMPTS[0]], ["orphan"], max_new_tokens=3, ignore_eos=True)[0].tokens
    with pytest.raises(ValueError, match="gone"):  # named by the caller, a missing negative is still an error
        lm.generate([PROMPTS[0]], ["orphan"], max_new_tokens=2, guidance_scale=2.0, guidance_negative="gone")


@pytest.mark.parametrize("kw, message", [
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=2.0, guidance_negative="a"), "adapter itself"),
    (dict(guidance_scale=2.0, guidance_negative="missing"), "missing"),
])
def test_bad_guidance_is_refused(lm, kw, message):
    with pytest.raises(ValueError, match=message):
        lm.generate([PROMPTS[0]], ["a"], max_new_tokens=2, **kw)


def test_num_samples_gives_seeded_distinct_samples(lm):
    out = lm.generate(PROMPTS[:2], ["a", "b"], max_new_tokens=6, temperature=1.0, seed=5, num_samples=3)
    assert len(out) == 6 and [g.adapter for g in out] == ["a"] * 3 + ["b"] * 3
    assert len({tuple(g.tokens) for g in out[:3]}) > 1
    for i in range(3):  # sample i is the row seeded seed + i
        assert out[i].tokens == lm.generate([PROMPTS[0]], ["a"], max_new_tokens=6, temperature=1.0,
                                            seed=5 + i)[0].tokens
    with pytest.raises(ValueError, match="num_samples"):
        lm.generate(PROMPTS[:1], ["a"], num_samples=0)


def test_guided_distribution_keeps_the_adapters_stop_probability_and_plausible_tokens():
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 50) * 3, torch.randn(3, 50) * 3
    out = guided_logits(cond, uncond, 4.0, plausibility=0.05, eos_ids=[7])
    probs, pc = out.softmax(-1), cond.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.allclose(probs[:, 7], pc[:, 7], atol=1e-6)  # guidance never changes when to stop
    implausible = pc < 0.05 * pc.max(-1, keepdim=True).values  # relative to the likeliest token, EOS included
    going = pc.clone()
    going[:, 7] = 0
    implausible[torch.arange(3), going.argmax(-1)] = False  # the likeliest continuing token always stays
    implausible[:, 7] = False
    assert (probs[implausible] == 0).all() and (probs[~implausible] > 0).all()
    # Where the adapter would rather stop, the likeliest continuing token still survives the floor.
    stop = torch.full((1, 50), -20.0)
    stop[0, 7], stop[0, 3] = 10.0, -5.0
    out = guided_logits(stop, torch.zeros(1, 50), 3.0, eos_ids=[7]).softmax(-1)
    assert torch.isfinite(out).all() and abs(float(out.sum()) - 1) < 1e-5
    assert out[0, 3] > 0 and out[0, 3] + out[0, 7] > 1 - 1e-5  # nothing but stopping or the best continuation
    # Without EOS handling and plausibility it is plain classifier-free guidance.
    plain = guided_logits(cond, uncond, 4.0, plausibility=0.0)
    ref = torch.log_softmax(uncond, -1) + 4.0 * (torch.log_softmax(cond, -1) - torch.log_softmax(uncond, -1))
    assert torch.allclose(plain, ref, atol=1e-5)


def test_layout_tokens_keep_the_adapters_probabilities(tiny_tokenizer):
    torch.manual_seed(1)
    cond, uncond = torch.randn(2, 60) * 3, torch.randn(2, 60) * 3
    layout = torch.zeros(60, dtype=torch.bool)
    layout[[2, 5, 11]] = True
    out = guided_logits(cond, uncond, 3.0, plausibility=0.0, eos_ids=[7], layout=layout).softmax(-1)
    pc = cond.softmax(-1)
    fixed = [2, 5, 7, 11]
    assert torch.allclose(out[:, fixed], pc[:, fixed], atol=1e-6)  # guidance does not touch layout or EOS
    assert torch.allclose(out.sum(-1), torch.ones(2), atol=1e-5)
    # The content tokens share the rest as plain guidance would rank them.
    content = [i for i in range(60) if i not in fixed]
    ref = (torch.log_softmax(uncond, -1) + 3.0 * (torch.log_softmax(cond, -1) - torch.log_softmax(uncond, -1)))
    ref = ref[:, content].softmax(-1) * (1 - pc[:, fixed].sum(-1, keepdim=True))
    assert torch.allclose(out[:, content], ref, atol=1e-5)
    # The real mask: punctuation, whitespace and runs of them are layout; words and word pieces are not.
    mask = layout_mask(tiny_tokenizer)
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert all(mask[i] for text in (",", " .", "\n\n", "!!!", ",,,,,,,,,,,,,,,,") for i in ids(text))
    assert not any(mask[i] for i in ids(" angry feelings") + ids("42"))
