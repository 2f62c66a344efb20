"""Guidance at the row's temperature: the contrast keeps its temperature-1 strength, and T 1 is untouched."""

from __future__ import annotations

import torch

from prefixtune.engine.guidance import guided_logits, tempered_scale
from prefixtune.engine.requests import Request
from prefixtune.engine.sampler import Group, Sampler
from prefixtune.engine.sampling import RowSampler, SamplingParams


def test_temperature_one_and_greedy_keep_the_scale_bit_for_bit():
    scale = torch.tensor([1.5, 3.0000002, 1.1, 7.3])
    assert torch.equal(tempered_scale(scale, torch.ones(4)), scale)


def test_the_sampled_distribution_is_the_tempered_adapter_times_the_contrast():
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 50), torch.randn(3, 50)
    scale, temperature = torch.tensor([1.5, 3.0, 1.5]), torch.tensor([0.7, 0.8, 1.3])
    # What the sampler draws from: the guided log-probs divided by the row's temperature.
    got = guided_logits(cond, uncond, tempered_scale(scale, temperature), plausibility=0) / temperature.view(-1, 1)
    lc, lu = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    want = lc / temperature.view(-1, 1) + (scale.view(-1, 1) - 1) * (lc - lu)  # p_c^(1/T) * (p_c / p_u)^(scale-1)
    torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(want, -1))
    # Without the adaptation the temperature would have multiplied the contrast by 1/T as well.
    untempered = guided_logits(cond, uncond, scale, plausibility=0) / temperature.view(-1, 1)
    assert not torch.allclose(torch.log_softmax(untempered, -1), torch.log_softmax(want, -1), atol=1e-3)


def _group(request_id: str, **params) -> Group:
    p = SamplingParams(**params)
    return Group(Request([1, 2], "a", p, request_id=request_id), RowSampler(p, torch.device("cpu")))


def test_the_sampler_guides_each_group_at_its_own_temperature():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)  # rows: (a, 0) (a, 1) (b, 0) (b, 1) (c, 0) (c, 1)
    groups = {"a": _group("a", temperature=1.0, guidance_scale=2.5, seed=0),
              "b": _group("b", temperature=0.7, guidance_scale=2.5, seed=0),
              "c": _group("c", temperature=0.0, guidance_scale=2.5)}
    order = [(k, i) for k in "abc" for i in (0, 1)]
    guided = Sampler(set(), lambda: torch.zeros(40, dtype=torch.bool))._guide(
        logits, {key: i for i, key in enumerate(order)}, list(groups.values()))
    for row, scale in ((0, 2.5), (2, 1 + 1.5 * 0.7), (4, 2.5)):  # T 1 and greedy: today's scale exactly
        want = guided_logits(logits[row:row + 1], logits[row + 1:row + 2], scale,
                             layout=torch.zeros(40, dtype=torch.bool))
        assert torch.equal(guided[row], want[0]), row
