"""The model runner's sampler: one call per step turns the running rows' logits into each request's next token.

A request is a *group* of rows (engine/policy.rows_of): one row; a guided pair (its adapter row and the
unconditioned companion, engine/guidance.py), whose logits are combined and whose rows both take the token the
pair draws; or a beam group of num_beams rows, advanced by its own engine/beam.py BeamSearch (the bookkeeping
follows transformers' beam search), whose rows are re-pointed at the beams they continue (`moves`). Every
sampled row keeps its own temperature, top-p, top-k, min-p and random stream (engine/sampling.py), so rows of
different requests share one vectorised call. Between guidance and sampling, one stage applies each row's own
penalties and logit bias (engine/penalties.py) and its grammar's token mask (engine/structured.py); rows without
them pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch

from prefixtune.engine.beam import BeamSearch
from prefixtune.engine.compose import combine_experts, note_tokens
from prefixtune.engine.guidance import adapter_nucleus, guided_logits, guided_temperature
from prefixtune.engine.logprobs import sampled_entries, wants_logprobs
from prefixtune.engine.penalties import RowPenalty, apply_penalties, new_penalty
from prefixtune.engine.policy import prefill_rows, rows_of
from prefixtune.engine.requests import Request
from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows
from prefixtune.engine.structured import RowGrammar, constrain


@dataclass(eq=False)
class Group:
    """One admitted request's sampling state (written by the engine's worker only)."""

    request: Request
    sampler: RowSampler
    search: BeamSearch | None = None  # a beam request's search state
    generated: int = 0  # tokens sampled (EOS not counted)
    penalty: RowPenalty | None = None  # its penalties / logit bias and generated-token counts (None: none)
    grammar: RowGrammar | None = None  # its structured output's matcher (None: free text)
    prompt_logprobs: list | None = None  # echo/scoring: prompt entries so far (engine/logprobs.py), sent once
    counts: torch.Tensor | None = None  # a composed group's drawn-token counts (V,) (engine/compose.note_tokens)
    evidence: float = 0.0  # a composed group's evidence so far, its score (engine/compose.note_tokens)
    step_logprobs: tuple | None = None  # a composed group's step: its parts' and negatives' log-probs (k, V) each

    @property
    def keys(self) -> list[tuple[str, int]]:
        """Runner row keys: (id, 0) its own row, (id, 1) a guided request's companion, (id, j) beam j."""
        return row_keys(self.request)

    @property
    def prefill_keys(self) -> list[tuple[str, int]]:
        """Rows that run the prompt: the beams of a group copy beam 0's prompt, a guided pair (a composed group)
        runs all its rows."""
        return self.keys[:prefill_rows(self.request)]


def row_keys(request: Request) -> list[tuple[str, int]]:
    return [(request.request_id, i) for i in range(rows_of(request))]


def new_group(request: Request, eos_ids: set[int], device: torch.device) -> Group:
    """Raises ValueError for settings beam search refuses (before the request takes any row)."""
    search = None
    if request.params.beam:
        search = BeamSearch([request.prompt_ids], request.params.beam_params(), eos_ids, device)
    params = request.params
    if params.guided and search is None:  # its top-p acts on the adapter's distribution (Sampler._guide)
        params = replace(params, top_p=1.0)
    grammar = RowGrammar(request.grammar) if request.grammar is not None else None
    return Group(request, RowSampler(params, device), search, penalty=new_penalty(request.params,
                 request.prompt_ids), grammar=grammar)


@dataclass
class Sampled:
    """What one sampling step decided."""

    tokens: dict[str, int] = field(default_factory=dict)  # request id -> token (sampling requests)
    row_tokens: dict[Hashable, int] = field(default_factory=dict)  # runner key -> token each row is fed next
    moves: list[tuple[Hashable, Hashable]] = field(default_factory=list)  # beam rows: (dst, src) before the feed
    ended: list[Group] = field(default_factory=list)  # beam groups whose search ended (results in the search)
    beam_steps: int = 0  # beam groups that advanced (one token of their request each)
    logprobs: dict = field(default_factory=dict)  # request id -> its token's entry (engine/logprobs.py)


_COMPANION = RowSampler(SamplingParams(), torch.device("cpu"))  # greedy: no generator, any device


class Sampler:
    def __init__(self, eos_ids: set[int], layout: Callable[[], torch.Tensor]):
        self.eos_ids = set(eos_ids)
        self.layout = layout  # the (V,) layout-token mask guidance leaves to the adapter, built on first use

    def __call__(self, logits: torch.Tensor, order: Sequence[Hashable], groups: dict[str, Group]) -> Sampled:
        """logits (B, V) of the running rows in slot order `order`; every row belongs to a group in `groups`."""
        slot = {key: i for i, key in enumerate(order)}
        guided = [g for g in groups.values() if g.request.params.guided]
        raw, logits = logits, self._guide(logits, slot, guided)  # raw: the rows' own logits (guided: a new tensor)
        composed = [g for g in groups.values() if g.request.experts is not None]
        logits = combine_experts(logits, slot, composed, sorted(self.eos_ids), self.layout)
        controlled = [g for g in groups.values() if g.penalty is not None or g.grammar is not None]
        logits = self._control(logits, raw, slot, controlled)
        # Companion rows take their group's token; a greedy placeholder sampler keeps the call vectorised.
        samplers = [groups[key[0]].sampler if key[1] == 0 else _COMPANION for key in order]
        drawn = sample_rows(self._temper(logits, raw, slot, guided), samplers)
        out = Sampled()
        recorded = wants_logprobs(groups.values())
        if recorded:  # of the distribution just sampled from (after every logit stage above)
            out.logprobs = sampled_entries(logits, slot, recorded, drawn)
        out.tokens = {key[0]: drawn[i] for i, key in enumerate(order) if key[1] == 0}
        for group in controlled:
            self._accept(group, out.tokens)
        note_tokens(composed, out.tokens, logits.shape[-1], logits.device)
        out.row_tokens = {key: out.tokens[key[0]] for key in order}
        for group in groups.values():
            if group.search is not None and not group.request.cancelled:
                self._beam_step(group, logits, slot, out)
        return out

    def _guide(self, logits: torch.Tensor, slot: dict, guided: list[Group]) -> torch.Tensor:
        if not guided:
            return logits
        rows = torch.tensor([slot[(g.request.request_id, 0)] for g in guided], device=logits.device)
        uncond = torch.tensor([slot[(g.request.request_id, 1)] for g in guided], device=logits.device)
        scale = torch.tensor([g.request.params.guidance_scale for g in guided], device=logits.device)
        # EOS and layout tokens keep the adapter's own probabilities (engine/guidance.py).
        combined = guided_logits(logits.index_select(0, rows), logits.index_select(0, uncond), scale,
                                 eos_ids=sorted(self.eos_ids), layout=self.layout())  # (G, V)
        return logits.index_copy(0, rows, combined)  # (B, V); companions' own rows are never sampled

    @staticmethod
    def _temper(logits: torch.Tensor, raw: torch.Tensor, slot: dict, guided: list[Group]) -> torch.Tensor:
        """The logits guided rows draw from (`raw`: the adapter rows' own logits, before guidance): the sampler
        divides by the request's T, and x T / T' makes that the guided temperature T'
        (guidance.guided_temperature); top-p picks the candidates on the adapter's own distribution (new_group
        leaves guided rows' sampler without it). Greedy and beam groups pick by score: factor 1, no nucleus.
        Only the draw sees this: log-probabilities stay those of the guided distribution, before temperature and
        truncation, as for every other row."""
        if not guided:
            return logits
        rows = torch.tensor([slot[(g.request.request_id, 0)] for g in guided], device=logits.device)
        scale = torch.tensor([g.request.params.guidance_scale for g in guided], device=logits.device)
        combined = logits.index_select(0, rows)  # (G, V)
        scored = [g.request.params.greedy or g.search is not None for g in guided]
        asked = torch.tensor([1.0 if s else g.request.params.temperature for g, s in zip(guided, scored)],
                             device=logits.device)
        temperature = guided_temperature(scale, asked)  # (G,)
        top_p = torch.tensor([1.0 if s else g.request.params.top_p for g, s in zip(guided, scored)],
                             device=logits.device)
        if bool((top_p < 1).any()):
            keep = adapter_nucleus(raw.index_select(0, rows), temperature, top_p)  # (G, V)
            cut = combined.masked_fill(~keep, float("-inf"))
            # A grammar may forbid every token of the adapter's nucleus: that row keeps what the grammar allows.
            combined = torch.where(torch.isfinite(cut).any(-1, keepdim=True), cut, combined)
        combined = combined * (asked / temperature).view(-1, 1)  # (G, V)
        return logits.index_copy(0, rows, combined)  # (B, V); companions' own rows are never sampled

    @staticmethod
    def _control(logits: torch.Tensor, raw: torch.Tensor, slot: dict, controlled: list[Group]) -> torch.Tensor:
        """Each controlled row's penalties and bias, then its grammar mask (masking last: no bias revives a
        token the grammar forbids). Beam groups never get here (SamplingParams refuses them). A guided row whose
        plausibility floor kept only tokens its grammar forbids is masked from its adapter's own logits (`raw`):
        the grammar always wins over guidance, and a row never has nothing to draw."""
        if not controlled:
            return logits
        penalised = [g for g in controlled if g.penalty is not None]
        logits = apply_penalties(logits, [slot[(g.request.request_id, 0)] for g in penalised],
                                 [g.penalty for g in penalised])
        masked = [g for g in controlled if g.grammar is not None]
        rows = [slot[(g.request.request_id, 0)] for g in masked]
        out = constrain(logits, rows, [g.grammar for g in masked])
        if not rows:
            return out
        # A row kept a token iff its largest logit is above -inf: one max over the batch (0.1-0.3 ms at batch 16
        # with a 49k vocabulary) where isfinite().any() row by row took 3 ms.
        kept = (out.amax(-1) > float("-inf")).tolist()
        empty = [i for i, row in enumerate(rows) if not kept[row]]
        if empty:
            fallback = constrain(raw, [rows[i] for i in empty], [masked[i].grammar for i in empty])
            index = torch.tensor([rows[i] for i in empty], device=logits.device)
            out = out.index_copy(0, index, fallback.index_select(0, index))
        return out

    def _accept(self, group: Group, tokens: dict[str, int]) -> None:
        token = tokens[group.request.request_id]
        if group.penalty is not None:
            group.penalty.accept(token)
        if group.grammar is not None and not group.grammar.accept(token):
            # Cannot happen with the mask applied; should it, the row ends rather than break its grammar.
            tokens[group.request.request_id] = min(self.eos_ids)

    @staticmethod
    def _beam_step(group: Group, logits: torch.Tensor, slot: dict, out: Sampled) -> None:
        keys = group.keys
        rows = torch.tensor([slot[key] for key in keys], device=logits.device)
        source, chosen = group.search.advance(logits.index_select(0, rows))  # from (num_beams, V)
        if group.search.done:
            out.ended.append(group)
            return
        out.beam_steps += 1
        for key, src, token in zip(keys, source, chosen):
            out.row_tokens[key] = token
            if keys[src] != key:
                out.moves.append((key, keys[src]))
