"""Guided rows at the request's temperature and top-p: the scale counts toward the temperature, top-p picks the
candidates on the adapter's own distribution, and T 1 / top-p 1 is untouched."""

from __future__ import annotations

import torch

from prefixtune.engine.guidance import adapter_nucleus, guided_logits, guided_temperature
from prefixtune.engine.requests import Request
from prefixtune.engine.sampler import Group, Sampler, new_group
from prefixtune.engine.sampling import RowSampler, SamplingParams


def test_the_scale_counts_toward_the_temperature():
    scale = torch.tensor([1.5, 1.5, 1.5, 3.0, 0.5, 2.0])
    temperature = torch.tensor([0.7, 0.5, 1.3, 0.2, 0.7, 1.0])
    # T 0.7 x1.5 samples as T 1; T 0.5 sharpens to 0.75; T >= 1 and a scale below 1 keep the request's.
    torch.testing.assert_close(guided_temperature(scale, temperature),
                               torch.tensor([1.0, 0.75, 1.3, 0.6, 0.7, 1.0]))


def test_the_nucleus_is_the_adapters_own():
    cond = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.9, 0.04, 0.03, 0.03]]))
    keep = adapter_nucleus(cond, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.6, 0.81, 1e-9]))
    assert keep.tolist() == [[True, True, False, False], [True, True, True, False], [True, False, False, False]]
    # At a lower temperature the adapter's top token holds more of the mass: fewer candidates.
    assert adapter_nucleus(cond[:1], torch.tensor([0.5]), torch.tensor([0.6])).tolist() == [[True, False, False, False]]


def _group(request_id: str, **params) -> Group:
    p = SamplingParams(**params)
    return Group(Request([1, 2], "a", p, request_id=request_id), RowSampler(p, torch.device("cpu")))


def test_a_guided_rows_sampler_leaves_top_p_to_the_guidance():
    guided = new_group(Request([1, 2], "a", SamplingParams(temperature=0.8, top_p=0.9, guidance_scale=1.5)), set(),
                       torch.device("cpu"))
    plain = new_group(Request([1, 2], "a", SamplingParams(temperature=0.8, top_p=0.9)), set(), torch.device("cpu"))
    assert guided.sampler.params.top_p == 1.0 and guided.request.params.top_p == 0.9
    assert plain.sampler.params.top_p == 0.9


def test_the_sampler_guides_each_group_at_its_own_temperature():
    torch.manual_seed(1)
    logits = torch.randn(8, 40)  # rows: (a, 0) (a, 1) (b, 0) (b, 1) ...: each group's row and its companion
    groups = {"a": _group("a", temperature=1.0, guidance_scale=2.5, seed=0),
              "b": _group("b", temperature=0.2, guidance_scale=2.5, seed=0),
              "c": _group("c", temperature=0.0, guidance_scale=2.5),
              "d": _group("d", temperature=0.8, guidance_scale=1.5, seed=0),
              "e": _group("e", temperature=1.0, top_p=0.5, guidance_scale=2.0, seed=0),
              "f": _group("f", temperature=0.0, top_p=0.5, guidance_scale=2.0)}
    logits = torch.cat([logits, torch.randn(4, 40)])
    order = [(k, i) for k in "abcdef" for i in (0, 1)]
    no_layout = torch.zeros(40, dtype=torch.bool)
    sampler, slot = Sampler(set(), lambda: no_layout), {key: i for i, key in enumerate(order)}
    combined = sampler._guide(logits, slot, list(groups.values()))
    guided = sampler._temper(combined, logits, slot, list(groups.values()))
    # T 1 and greedy (whatever its top-p): exactly today's guided logits; T 0.2 x2.5 samples at T 0.5 (the
    # sampler divides by 0.2); T 0.8 x1.5 samples at T 1.
    for row, scale, factor in ((0, 2.5, None), (2, 2.5, 0.2 / 0.5), (4, 2.5, None), (6, 1.5, 0.8), (10, 2.0, None)):
        want = guided_logits(logits[row:row + 1], logits[row + 1:row + 2], scale, layout=no_layout)[0]
        if factor is None:
            assert torch.equal(guided[row], want), row
        else:
            torch.testing.assert_close(guided[row], want * factor)
    # Top-p 0.5 at T 1: the guided logits inside the adapter's own 0.5-nucleus, nothing outside it.
    keep = adapter_nucleus(logits[8:9], torch.tensor([1.0]), torch.tensor([0.5]))[0]
    want = guided_logits(logits[8:9], logits[9:10], 2.0, layout=no_layout)[0]
    assert torch.equal(guided[8], want.masked_fill(~keep, float("-inf"))) and 0 < int(keep.sum()) < 40


def test_a_guided_rows_logprobs_are_the_guided_distribution_whatever_its_temperature_and_top_p():
    torch.manual_seed(3)
    logits = torch.randn(4, 40)  # (a, 0) (a, 1) (b, 0) (b, 1)
    no_layout = torch.zeros(40, dtype=torch.bool)
    groups = {"a": _group("a", temperature=0.5, top_p=0.6, guidance_scale=2.0, seed=0, logprobs=3),
              "b": _group("b", temperature=1.0, guidance_scale=2.0, seed=0, logprobs=3)}
    order = [(k, i) for k in "ab" for i in (0, 1)]
    out = Sampler(set(), lambda: no_layout)(logits.clone(), order, groups)
    for row, rid in ((0, "a"), (2, "b")):
        want = torch.log_softmax(guided_logits(logits[row:row + 1], logits[row + 1:row + 2], 2.0,
                                               layout=no_layout)[0], -1)
        logprob, top = out.logprobs[rid]
        assert abs(logprob - float(want[out.tokens[rid]])) < 1e-5, rid  # not the tempered, truncated draw's
        assert [t for t, _ in top] == want.topk(3).indices.tolist()


def test_a_guided_rows_nucleus_never_empties_what_a_grammar_allows():
    logits = torch.zeros(2, 8)
    logits[0, :2] = torch.tensor([3.0, 1.0])  # the adapter's nucleus at top-p 0.5 is token 0 alone
    groups = {"a": _group("a", temperature=1.0, top_p=0.5, guidance_scale=2.0, seed=0)}
    order = [("a", 0), ("a", 1)]
    sampler, slot = Sampler(set(), lambda: torch.zeros(8, dtype=torch.bool)), {key: i for i, key in enumerate(order)}
    combined = sampler._guide(logits, slot, list(groups.values()))
    combined[0, 0] = float("-inf")  # a grammar forbids token 0
    tempered = sampler._temper(combined, logits, slot, list(groups.values()))
    assert torch.equal(torch.isfinite(tempered[0]), torch.isfinite(combined[0]))  # the grammar's set, not nothing
    assert bool(torch.isfinite(tempered[0]).any())
    assert sampler(logits, order, groups).tokens["a"] == 0  # without a grammar the nucleus holds


def test_a_grammar_wins_over_a_guided_rows_plausibility_floor(tiny_lm):
    """The floor (5% of the adapter's top token) may keep only tokens the grammar forbids: the row then draws
    from what the grammar allows under the adapter's own logits, instead of failing the whole step."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.engine.structured import Grammars, StructuredOutput

    logits = torch.full((2, tiny_lm.model.config.vocab_size), -20.0)
    tok = tiny_lm.tokenizer
    yes, no = tok("yes", add_special_tokens=False).input_ids[0], tok("no", add_special_tokens=False).input_ids[0]
    logits[0, tok("maybe", add_special_tokens=False).input_ids[0]] = 10.0  # the floor keeps this token alone
    logits[0, yes], logits[0, no] = 0.0, -1.0
    eos = set(PrefixLM(tiny_lm).eos_ids())
    grammars = Grammars(tok, logits.shape[-1], eos)
    params = SamplingParams(guidance_scale=2.0, structured=StructuredOutput(choice=("yes", "no")))
    request = Request([1, 2], "a", params, request_id="a", grammar=grammars.compile(params.structured))
    groups = {"a": new_group(request, eos, torch.device("cpu"))}
    no_layout = torch.zeros(logits.shape[-1], dtype=torch.bool)
    out = Sampler(eos, lambda: no_layout)(logits, [("a", 0), ("a", 1)], groups)
    assert out.tokens["a"] == yes
