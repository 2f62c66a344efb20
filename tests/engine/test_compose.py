"""Composed adapters ("a+b"): a product of experts group, or one row with the parts' prefixes side by side."""

from __future__ import annotations

import math

import pytest
import torch

from prefixtune.engine.compose import (COMPOSE_BOOST, REPEAT_DECAY, ComposeError, build_experts, concat_kv,
                                       part_scales, parts_of)
from prefixtune.engine.generation import candidate_seed
from prefixtune.engine.guidance import product_logits
from prefixtune.engine.lm import PrefixLM
from prefixtune.prefix.model import PrefixModel
from prefixtune.store import AdapterStore
from prefixtune.testing import write_random_adapter

PROMPTS = ["The weather today is", "Hi", "Once upon a time, in a land far away,"]
EMOTIONS = ["anger", "fear", "joy", "love", "sadness", "surprise"]
TOPICS = ["business", "scitech", "sports", "world"]
# The fixture's default scales (part_scales): each recommendation x COMPOSE_BOOST, the 4-topic part x ln 4 / ln 6.
DEFAULT_SCALES = [2.0 * COMPOSE_BOOST, 1.5 * COMPOSE_BOOST * math.log(4) / math.log(6)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("compose-store")
    write_random_adapter(root, "emo-all", tiny_lm, tokens=3, seed=3)
    write_random_adapter(root, "top-all", tiny_lm, tokens=5, seed=6)
    write_random_adapter(root, "emo-joy", tiny_lm, tokens=4, seed=1, guidance={"scale": 2.0, "negative": "emo-all"},
                         label="joy", labels=EMOTIONS)
    write_random_adapter(root, "top-sports", tiny_lm, tokens=6, seed=2,
                         guidance={"scale": 1.5, "negative": "top-all"}, label="sports", labels=TOPICS)
    write_random_adapter(root, "plain", tiny_lm, tokens=4, seed=7)
    return PrefixLM(tiny_lm, AdapterStore(root))


def _reference(lm, prompt, parts, negatives, scales, steps):
    """Product-of-experts greedy decoding from separate full forwards per step (no cache, no batching); a token's
    push decays with the times it was already drawn."""
    model = PrefixModel(lm.model)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    kv = [lm.adapter(p).kv for p in parts]
    neg = [None if n is None else lm.adapter(n).kv for n in negatives]
    out = []
    for _ in range(steps):
        mask = torch.ones_like(ids)
        conds = torch.cat([model(ids, mask, prefixes=[k]).logits[:, -1] for k in kv])  # (k, V)
        unconds = torch.cat([model(ids, mask, prefixes=[n]).logits[:, -1] for n in neg])  # (k, V)
        counts = torch.zeros(conds.shape[-1]).index_add(0, torch.tensor(out, dtype=torch.long),
                                                        torch.ones(len(out)))  # (V,)
        token = int(product_logits(conds, unconds, torch.tensor(scales), eos_ids=sorted(lm.eos_ids()),
                                   layout=lm.layout_mask(), decay=REPEAT_DECAY ** counts).argmax(-1))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_product_is_the_parts_mixture_plus_each_parts_push():
    torch.manual_seed(0)
    conds, uncond = torch.randn(2, 50), torch.randn(2, 50)
    got = product_logits(conds, uncond, torch.tensor([2.5, 1.5]), plausibility=0.0)
    lc, lu = torch.log_softmax(conds, -1), torch.log_softmax(uncond, -1)
    mixture = torch.log(torch.softmax(conds, -1).mean(0))
    assert torch.allclose(got, mixture + 2.5 * (lc[0] - lu[0]) + 1.5 * (lc[1] - lu[1]), atol=1e-4)
    # Scale 0 for every part: the parts' mixture itself.
    assert torch.allclose(product_logits(conds, uncond, torch.zeros(2), plausibility=0.0), mixture, atol=1e-5)


def test_decay_weighs_each_tokens_push():
    torch.manual_seed(1)
    conds, uncond = torch.randn(2, 20), torch.randn(2, 20)
    scales = torch.tensor([3.0, 2.0])
    full = product_logits(conds, uncond, scales, plausibility=0.0)
    decay = torch.ones(20)
    decay[4] = 0.25
    got = product_logits(conds, uncond, scales, plausibility=0.0, decay=decay)
    mixture = torch.log(torch.softmax(conds, -1).mean(0))
    assert torch.allclose(got[torch.arange(20) != 4], full[torch.arange(20) != 4], atol=1e-5)
    assert torch.allclose(got[4] - mixture[4], 0.25 * (full[4] - mixture[4]), atol=1e-4)


def test_product_floor_is_over_the_parts_mixture():
    # Part 0 is sure of token 0; part 1 prefers token 1, which part 0 finds very rare. Under the parts'
    # geometric mean token 1 would fall below the plausibility floor; under their mixture it stays choosable.
    conds = torch.full((2, 6), -10.0)
    conds[0, 0], conds[1, 0], conds[1, 1] = 10.0, 0.0, 2.0
    uncond = torch.zeros(2, 6)
    uncond[1, 2] = 3.0
    got = product_logits(conds, uncond, torch.tensor([3.0, 1.0]))
    assert torch.isfinite(got[:2]).all() and torch.isinf(got[2:]).all()
    lc, lu = torch.log_softmax(conds, -1), torch.log_softmax(uncond, -1)
    mixture = torch.log(torch.softmax(conds, -1).mean(0))
    expected = mixture + 3.0 * (lc[0] - lu[0]) + 1.0 * (lc[1] - lu[1])
    assert torch.allclose(got[:2], expected[:2], atol=1e-4)


@pytest.mark.parametrize("recommended, labels, expected", [
    ([1.5, 1.5], [6, 4], [3.0, 3.0 * math.log(4) / math.log(6)]),  # more labels, the stronger push
    ([1.5, 2.0], [4, 4], [3.0, 4.0]),  # equal label counts: each recommendation x COMPOSE_BOOST
    ([1.5, 1.5], [6, 0], [3.0, 3.0]),  # a part with no known label set counts as the largest
    ([1.0, 1.5], [6, 4], [1.0, 3.0 * math.log(4) / math.log(6)]),  # a part recommending no guidance stays so
])
def test_part_scales_follow_the_label_counts(recommended, labels, expected):
    assert part_scales(recommended, labels) == pytest.approx(expected)


def test_product_of_experts_equals_separate_forwards(lm):
    """Each part against its own family negative at its own scale (part_scales from the manifests), pushes
    decaying with repeats."""
    assert build_experts(lm, "emo-joy+top-sports", None, None, None).scales == pytest.approx(DEFAULT_SCALES)
    got = lm.generate(PROMPTS[:2], [("emo-joy", "top-sports")] * 2, max_new_tokens=12, ignore_eos=True)
    for prompt, row in zip(PROMPTS, got):
        assert row.adapter == "emo-joy+top-sports"
        assert row.tokens == _reference(lm, prompt, ["emo-joy", "top-sports"], ["emo-all", "top-all"],
                                         DEFAULT_SCALES, 12)


def _evidence(lm, prompt, parts, negatives, tokens):
    """sum over tokens and parts of log p_part - log p_neg at each drawn token, from full forwards (no cache)."""
    model = PrefixModel(lm.model)
    ids = torch.cat([lm.tokenizer(prompt, return_tensors="pt").input_ids, torch.tensor([tokens])], dim=1)
    n = len(tokens)

    def logp(name):  # (n, V): the distributions the n tokens were drawn from
        kv = lm.adapter(name).kv
        return torch.log_softmax(model(ids, torch.ones_like(ids), prefixes=[kv]).logits[0, -n - 1:-1].float(), -1)

    drawn = torch.tensor(tokens).view(-1, 1)
    return sum(float((logp(p) - logp(q)).gather(1, drawn).sum()) for p, q in zip(parts, negatives))


def test_score_is_the_parts_evidence(lm):
    """A composed row's score: how much its tokens say each part's label against the part's own negative."""
    got = lm.generate(PROMPTS[:2], "emo-joy+top-sports", max_new_tokens=10, ignore_eos=True)
    for prompt, row in zip(PROMPTS, got):
        want = _evidence(lm, prompt, ["emo-joy", "top-sports"], ["emo-all", "top-all"], row.tokens)
        assert row.score == pytest.approx(want, abs=1e-3)


def test_best_of_keeps_the_samples_with_the_most_evidence(lm):
    kw = dict(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    seeds = [5, candidate_seed(5, 1), candidate_seed(5, 2), candidate_seed(5, 3)]
    alone = [lm.generate(PROMPTS[:1], "emo-joy+top-sports", seed=s, **kw)[0] for s in seeds]
    ranked = sorted(alone, key=lambda g: g.score, reverse=True)
    assert len({tuple(g.tokens) for g in alone}) > 1  # the candidates differ: the choice is a real one
    best = lm.generate(PROMPTS[:1], "emo-joy+top-sports", seed=5, best_of=4, **kw)
    assert [g.tokens for g in best] == [ranked[0].tokens]
    alone2 = [lm.generate(PROMPTS[:1], "emo-joy+top-sports", seed=s, **kw)[0] for s in (5, 6)] + alone[2:]
    two = lm.generate(PROMPTS[:1], "emo-joy+top-sports", seed=5, num_samples=2, best_of=4, **kw)
    assert [g.tokens for g in two] == [g.tokens for g in sorted(alone2, key=lambda g: g.score, reverse=True)[:2]]
    assert two[0].score >= two[1].score


@pytest.mark.parametrize("adapter, kw", [("emo-joy", {}), ("emo-joy+top-sports", {"compose_mode": "concat"}),
                                         ("emo-joy+top-sports", {"num_samples": 3})])
def test_best_of_is_refused_where_nothing_ranks_the_samples(lm, adapter, kw):
    with pytest.raises(ValueError, match="best_of"):
        lm.generate(PROMPTS[:1], adapter, max_new_tokens=4, temperature=1.0, best_of=2, **kw)


def test_weights_set_each_parts_scale(lm):
    got = lm.generate(PROMPTS[:1], "emo-joy+top-sports", max_new_tokens=6, ignore_eos=True,
                      compose_weights=[3.0, 0.5])
    assert got[0].tokens == _reference(lm, PROMPTS[0], ["emo-joy", "top-sports"], ["emo-all", "top-all"],
                                       [3.0, 0.5], 6)
    other = lm.generate(PROMPTS[:1], "emo-joy+top-sports", max_new_tokens=6, ignore_eos=True,
                        compose_weights=[0.5, 3.0])
    assert other[0].tokens != got[0].tokens


def test_parts_without_a_negative_share_one_base_row(lm):
    experts = build_experts(lm, "plain+emo-joy", None, None, None)
    assert experts.negatives == [None, "emo-all"] and experts.rows == 4
    experts = build_experts(lm, "plain+emo-joy", [2.0, 2.0], None, "none")
    assert experts.negatives == [None] and experts.rows == 3 and experts.negative_of == [0, 0]


def test_concat_is_the_parts_prefixes_side_by_side(lm):
    kv = lm.adapter("emo-joy+top-sports").kv
    assert kv.shape[2] == 4 + 6  # (2L, kv_heads, P1 + P2, head_dim)
    assert torch.equal(kv, torch.cat([lm.adapter("emo-joy").kv, lm.adapter("top-sports").kv], dim=2))
    got = lm.generate(PROMPTS[:1], "emo-joy+top-sports", max_new_tokens=6, ignore_eos=True, compose_mode="concat",
                      guidance_scale=1.0)
    model = PrefixModel(lm.model)
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    out = []
    for _ in range(6):
        token = int(model(ids, torch.ones_like(ids), prefixes=[kv]).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert got[0].tokens == out


def test_concat_guidance_defaults_to_the_parts_negatives_side_by_side(lm):
    assert lm.guidance("emo-joy+top-sports") == (1.75, "emo-all+top-all")
    assert lm.guidance("plain+emo-joy") == (2.0, None)  # a part without a negative: against the base model
    write_random_adapter(lm.store.root, "emo-sad", lm.loaded, tokens=4, seed=8,
                         guidance={"scale": 2.0, "negative": "emo-all"})
    assert lm.guidance("emo-joy+emo-sad") == (2.0, "emo-all")  # one family: its negative once


@pytest.mark.parametrize("mode", ["guidance", "concat"])
def test_composed_row_in_a_mixed_batch_equals_it_alone(lm, mode):
    """Greedy (engine/DEVELOPERS.md: sampled equality holds only up to float noise on a random model)."""
    alone = lm.generate(PROMPTS[2:], [("emo-joy", "top-sports")], max_new_tokens=8, ignore_eos=True,
                        compose_mode=mode)
    mixed = lm.generate(PROMPTS, ["plain", "emo-joy+top-sports", "emo-joy+top-sports"], max_new_tokens=8,
                        ignore_eos=True, compose_mode=mode, guidance_scale=None)
    assert mixed[2].tokens == alone[0].tokens
    guided_mixed = lm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], ["emo-joy", ("emo-joy", "top-sports"), None],
                               max_new_tokens=8, ignore_eos=True, compose_mode=mode)
    assert guided_mixed[1].tokens == alone[0].tokens
    assert guided_mixed[0].tokens == lm.generate(PROMPTS[:1], "emo-joy", max_new_tokens=8, ignore_eos=True)[0].tokens


def test_sampled_composed_rows_are_seeded(lm):
    a = lm.generate(PROMPTS[:1], "emo-joy+top-sports", max_new_tokens=8, temperature=1.0, seed=5, num_samples=2)
    b = lm.generate(PROMPTS[:1], "emo-joy+top-sports", max_new_tokens=8, temperature=1.0, seed=5, num_samples=2)
    assert [g.tokens for g in a] == [g.tokens for g in b]


@pytest.mark.parametrize("adapter, kw, message", [
    ("emo-joy+nope", {}, "nope"),
    ("emo-joy+emo-joy", {}, "twice"),
    ("emo-joy+", {}, "two or more"),
    ("emo-joy+top-sports+plain+emo-all+top-all", {}, "max_compose"),
    ("emo-joy+top-sports", {"compose_mode": "stack"}, "compose_mode"),
    ("emo-joy+top-sports", {"compose_weights": [1.0]}, "one weight per adapter"),
    ("emo-joy+top-sports", {"compose_weights": [1.0, -2]}, ">= 0"),
    ("emo-joy+top-sports", {"num_beams": 2}, "beam"),
])
def test_bad_compositions_are_refused_naming_the_problem(lm, adapter, kw, message):
    with pytest.raises(Exception, match=message):
        lm.generate(PROMPTS[:1], adapter, max_new_tokens=4, **kw)


def test_incompatible_shapes_are_refused():
    a = torch.zeros(4, 2, 3, 8)  # (2L, kv_heads, P, head_dim)
    with pytest.raises(ComposeError, match="share layers"):
        concat_kv([a, torch.zeros(4, 2, 3, 16)])
    with pytest.raises(ComposeError, match="max_compose"):
        parts_of("a+b+c", limit=2)
