"""Per-row sampling: every row of a mixed batch keeps its own temperature, top-p, top-k and seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefixtune.engine.guidance import is_guided, validate_scale


@dataclass
class SamplingParams:
    """How one request picks its next tokens."""

    max_new_tokens: int = 40  # generated tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # fixes the row's random stream (independent of batch mates)
    stop: list[str] = field(default_factory=list)  # stop strings (cut from the text)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    guidance_scale: float = 1.0  # >1 sharpens the adapter against an unconditioned row (engine/guidance.py); 1 = off

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also rejects NaN
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        validate_scale(self.guidance_scale)

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
    """Draws the next token of one row from its logits with its own generator."""

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
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits.float() / p.temperature
        if p.top_k > 0:
            # By index, not by threshold: ties with the k-th logit must not widen the set beyond k.
            keep = torch.topk(logits, min(p.top_k, logits.shape[-1])).indices
            logits = torch.full_like(logits, float("-inf")).scatter(-1, keep, logits[keep])
        probs = torch.softmax(logits, dim=-1)
        if p.top_p >= 1.0:
            return int(torch.multinomial(probs, 1, generator=self.generator))
        # The nucleus almost always lies inside the top candidates; sorting 1024 of a 49k vocabulary instead
        # of all of it is exact whenever their mass reaches top_p (else fall back to the full sort).
        top, order = torch.topk(probs, min(_NUCLEUS_CANDIDATES, probs.shape[-1]))  # sorted, descending
        if float(top.sum()) < p.top_p:
            top, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (always at least the top token).
        top = top.masked_fill(top.cumsum(-1) - top >= p.top_p, 0.0)
        return int(order[torch.multinomial(top, 1, generator=self.generator)])


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token per row; an all-greedy batch takes one vectorised argmax."""
    if all(s.params.greedy for s in samplers):
        return torch.argmax(logits, dim=-1).tolist()
    return [s(row) for s, row in zip(samplers, logits)]
