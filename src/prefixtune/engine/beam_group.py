"""Beam groups in the serving engine: a beam request is a group of num_beams rows of the continuous batch.

As a guided pair, the group is a scheduler concept: the policy admits and releases it as one request
(policy.rows_of), the runner prefills its prompt once and copies it to the other beams (ModelRunner.add
shares identical rows), and other requests' rows decode in the same steps. Each step the group's logits go
to its own engine/beam.py BeamSearch (the bookkeeping offline search uses, so the beams are the ones
`PrefixLM.generate(num_beams=...)` finds), each row is re-pointed at the beam it continues (one
ModelRunner.reorder for every group) and takes that beam's token. When the search ends the group leaves
with its best hypotheses in one RowEvent; the output processor turns them into num_return_sequences choices.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from prefixtune.engine.beam import BeamSearch


def new_search(request, eos_ids: set[int], device: torch.device) -> BeamSearch | None:
    """The request's search state (None when it samples); raises ValueError for settings beams refuse."""
    if not request.params.beam:
        return None
    return BeamSearch([request.prompt_ids], request.params.beam_params(), eos_ids, device)


def step_groups(states: Sequence, logits: torch.Tensor, slot: dict[Hashable, int]
                ) -> tuple[dict[Hashable, int], list[tuple[Hashable, Hashable]], list]:
    """One beam step for each running group (states with a `search`; cancelled ones wait for release).

    logits (B, V) in slot order; returns each row's next token by runner key, the (dst, src) row moves to
    apply before the decode step, and the states whose search has ended (results in `state.search.results`).
    """
    tokens: dict[Hashable, int] = {}
    moves: list[tuple[Hashable, Hashable]] = []
    ended = []
    for state in states:
        request, search = state.request, state.search
        if request.cancelled:
            continue  # leaves at the next iteration; its rows decode whatever they hold meanwhile
        keys = [(request.request_id, j) for j in range(request.params.num_beams)]
        rows = torch.tensor([slot[key] for key in keys], device=logits.device)
        source, chosen = search.advance(logits.index_select(0, rows))  # from (num_beams, V)
        if search.done:
            ended.append(state)
            continue
        for key, src, token in zip(keys, source, chosen):
            tokens[key] = token
            if keys[src] != key:
                moves.append((key, keys[src]))
    return tokens, moves, ended
