"""Guided rows at the request's temperature: the scale counts toward the temperature, and T 1 is untouched."""

from __future__ import annotations

import torch

from prefixtune.engine.guidance import guided_logits, guided_temperature
from prefixtune.engine.requests import Request
from prefixtune.engine.sampler import Group, Sampler
from prefixtune.engine.sampling import RowSampler, SamplingParams


def test_the_scale_counts_toward_the_temperature():
    scale = torch.tensor([1.5, 1.5, 1.5, 3.0, 0.5, 2.0])
    temperature = torch.tensor([0.7, 0.5, 1.3, 0.2, 0.7, 1.0])
    # T 0.7 x1.5 samples as T 1; T 0.5 sharpens to 0.75; T >= 1 and a scale below 1 keep the request's.
    torch.testing.assert_close(guided_temperature(scale, temperature),
                               torch.tensor([1.0, 0.75, 1.3, 0.6, 0.7, 1.0]))


def _group(request_id: str, **params) -> Group:
    p = SamplingParams(**params)
    return Group(Request([1, 2], "a", p, request_id=request_id), RowSampler(p, torch.device("cpu")))


def test_the_sampler_guides_each_group_at_its_own_temperature():
    torch.manual_seed(1)
    logits = torch.randn(8, 40)  # rows: (a, 0) (a, 1) (b, 0) (b, 1) ...: each group's row and its companion
    groups = {"a": _group("a", temperature=1.0, guidance_scale=2.5, seed=0),
              "b": _group("b", temperature=0.2, guidance_scale=2.5, seed=0),
              "c": _group("c", temperature=0.0, guidance_scale=2.5),
              "d": _group("d", temperature=0.8, guidance_scale=1.5, seed=0)}
    order = [(k, i) for k in "abcd" for i in (0, 1)]
    no_layout = torch.zeros(40, dtype=torch.bool)
    guided = Sampler(set(), lambda: no_layout)._guide(logits, {key: i for i, key in enumerate(order)},
                                                      list(groups.values()))
    # T 1 and greedy: exactly today's guided logits (nothing at T 1 moves); T 0.2 x2.5 samples at T 0.5 (the
    # sampler divides by 0.2); T 0.8 x1.5 samples at T 1.
    for row, scale, factor in ((0, 2.5, None), (2, 2.5, 0.2 / 0.5), (4, 2.5, None), (6, 1.5, 0.8)):
        want = guided_logits(logits[row:row + 1], logits[row + 1:row + 2], scale, layout=no_layout)[0]
        if factor is None:
            assert torch.equal(guided[row], want), row
        else:
            torch.testing.assert_close(guided[row], want * factor)
