"""Per-row sampling: every row of a mixed batch keeps its own temperature, top-p, top-k and seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefixtune.engine.beam import BeamParams, check_beam_request
from prefixtune.engine.guidance import is_guided, validate_scale
from prefixtune.engine.penalties import validate_penalties
from prefixtune.engine.structured import StructuredOutput


@dataclass
class SamplingParams:
    """How one request picks its next tokens."""

    max_new_tokens: int = 40  # generated tokens at most
    temperature: float = 0.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # sample among the k likeliest tokens (0 = no top-k cut)
    seed: int | None = None  # fixes the row's random stream (independent of batch mates)
    stop: list[str] = field(default_factory=list)  # stop strings (cut from the text)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    guidance_scale: float = 1.0  # >1 sharpens the adapter against an unconditioned row (engine/guidance.py); 1 = off
    num_beams: int = 1  # > 1: beam search (engine/beam.py); the request is a group of num_beams batch rows
    length_penalty: float = 1.0  # beam search: finished score = log-prob sum / generated_len ** length_penalty
    no_repeat_ngram_size: int = 0  # beam search: no n-gram of this size twice in prompt + output (0 = off)
    early_stopping: bool = False  # beam search: end as soon as num_beams hypotheses are finished
    num_return_sequences: int = 1  # beam search: best beams returned, as Outputs with index 0 .. n-1
    min_p: float = 0.0  # drop tokens under min_p x the top token's probability (after temperature); 0 = off
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token already generated (engine/penalties.py)
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often a token was generated
    repetition_penalty: float = 1.0  # vLLM/HF's: prompt and generated tokens' logits divided by it (> 0); 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans it)
    structured: StructuredOutput | None = None  # the output must match this (engine/structured.py); None = free
    logprobs: int | None = None  # each sampled token's log-prob and its top N alternatives (engine/logprobs.py)
    prompt_logprobs: int | None = None  # each prompt token's log-prob and top N (echo, scoring); None = off

    def validate(self) -> None:
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError("max_new_tokens must be >= 1 (0 only when scoring the prompt: prompt_logprobs)")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (top alternatives per token) or None (off)")
        if self.beam and (self.logprobs is not None or self.prompt_logprobs is not None):
            raise ValueError("log-probabilities are not returned for beam search; drop logprobs or num_beams")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also rejects NaN
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:  # also rejects NaN
            raise ValueError("min_p must be in [0, 1]")
        validate_scale(self.guidance_scale)
        validate_penalties(self.presence_penalty, self.frequency_penalty, self.repetition_penalty, self.logit_bias)
        if self.structured is not None:
            self.structured.validate()
            if self.ignore_eos:
                raise ValueError("ignore_eos with a structured output: the grammar ends the output; drop ignore_eos")
        if self.beam and self.controlled:
            raise ValueError("beam search takes no penalties, logit_bias or structured output; sample instead "
                             "(num_beams 1)")
        if self.beam or self.no_repeat_ngram_size or self.num_return_sequences != 1:
            self.beam_params()

    def beam_params(self) -> BeamParams:
        """This request's beam settings, or a ValueError naming a setting that makes no sense with beams."""
        return check_beam_request(self.num_beams, self.max_new_tokens, self.length_penalty, self.no_repeat_ngram_size,
                                  self.early_stopping, self.temperature, self.ignore_eos, self.guidance_scale,
                                  num_return_sequences=self.num_return_sequences)

    @property
    def beam(self) -> bool:
        return self.num_beams > 1

    @property
    def controlled(self) -> bool:
        """Whether the sampler's penalty or grammar stage touches this row's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.structured is not None)

    @property
    def guided(self) -> bool:
        return is_guided(self.guidance_scale)

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow to inf and sampling is argmax anyway.
        return self.temperature < MIN_TEMPERATURE


_NUCLEUS_CANDIDATES = 1024
MIN_TEMPERATURE = 1e-5


class RowSampler:
    """One row's sampling settings and random stream (its own generator: batch mates never shift its draws)."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:  # any integer works: torch takes 64 bits
                self.generator.manual_seed(int(params.seed) % 2**63)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token from one row's logits (V,); the same draw sample_rows makes for this row in any batch."""
        return sample_rows(logits.view(1, -1), [self])[0]


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token per row of logits (B, V), each row with its own temperature, top-k, min-p, top-p and generator.

    Temperature, top-k, softmax and the nucleus candidates are computed for all sampled rows at once; each
    row then draws from its own generator (torch.multinomial on a tensor: no host sync), and the whole batch
    syncs once, at the final .tolist(). A seeded row's tokens therefore do not depend on its batch mates, and
    are the ones a row sampled alone draws (same distribution, same generator stream).
    """
    greedy = torch.argmax(logits, dim=-1)  # (B,)
    sampled = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if not sampled:
        return greedy.tolist()
    device = logits.device
    params = [samplers[i].params for i in sampled]
    index = torch.tensor(sampled, dtype=torch.long, device=device)
    x = logits.index_select(0, index).float()  # (S, V)
    vocab = x.shape[-1]
    x = x / torch.tensor([p.temperature for p in params], device=device).view(-1, 1)
    if any(p.top_k > 0 for p in params):
        # By index, not by threshold: ties with the k-th logit must not widen the set beyond k.
        width = min(vocab, max(p.top_k for p in params))
        values, order = torch.topk(x, width, dim=-1)  # (S, width), descending
        k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device).view(-1, 1)
        values = values.masked_fill(torch.arange(width, device=device).view(1, -1) >= k, float("-inf"))
        cut = torch.full_like(x, float("-inf")).scatter(-1, order, values)
        x = torch.where(k < vocab, cut, x)  # rows without top-k keep everything
    probs = torch.softmax(x, dim=-1)  # (S, V)
    if any(p.min_p > 0 for p in params):
        # Min-p (Nguyen et al. 2024): the floor scales with the model's confidence, so a flat distribution keeps
        # its many candidates and a peaked one loses its long tail. The top token always stays.
        floor = torch.tensor([p.min_p for p in params], device=device).view(-1, 1)
        probs = probs.masked_fill(probs < floor * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)  # top_p below measures mass within what is left
    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    candidates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if nucleus:
        # The nucleus almost always lies inside the top candidates; sorting 1024 of a 49k vocabulary instead of
        # all of it is exact whenever their mass reaches top_p (else that row falls back to the full sort).
        rows = torch.tensor(nucleus, device=device)
        top, order = torch.topk(probs.index_select(0, rows), min(_NUCLEUS_CANDIDATES, vocab), dim=-1)  # (N, C)
        short = (top.sum(-1) < torch.tensor([params[j].top_p for j in nucleus], device=device)).tolist()
        for n, j in enumerate(nucleus):
            t, o = (torch.sort(probs[j], descending=True) if short[n] else (top[n], order[n]))
            # Keep the smallest set whose mass reaches top_p, always the top token (a top_p below float32's
            # smallest normal compares as 0 and would otherwise mask every token).
            drop = t.cumsum(-1) - t >= params[j].top_p
            drop[0] = False
            candidates[j] = (t.masked_fill(drop, 0.0), o)
    draws = []
    for j, i in enumerate(sampled):
        generator = samplers[i].generator
        if j in candidates:
            t, o = candidates[j]
            draws.append(o[torch.multinomial(t, 1, generator=generator)])
        else:
            draws.append(torch.multinomial(probs[j], 1, generator=generator))
    return greedy.index_copy(0, index, torch.cat(draws)).tolist()
