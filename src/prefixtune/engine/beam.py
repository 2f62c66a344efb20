"""Beam search bookkeeping for the engine: a beam request is a group of num_beams rows that carry its prefix.

The search follows `transformers`' own beam search step for step (top 2*num_beams candidates by summed
log-probability, finished hypotheses scored `sum / generated_len ** length_penalty` with EOS counted, the
same early-stop heuristic and n-gram ban over prompt + output), so a base-model row gives the tokens
`model.generate(num_beams=..., do_sample=False)` gives. The engine's sampler (engine/sampler.py) drives one
BeamSearch per request on the model runner's rows, beside other requests' rows of any adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


MAX_LENGTH_PENALTY = 10.0
_NEG = -1.0e9  # the score transformers gives impossible candidates (kept identical so ties break alike)


@dataclass
class BeamParams:
    """How beam search decodes one call (every row alike; rows may still use different adapters)."""

    num_beams: int = 4  # hypotheses kept per row (1 = greedy)
    max_new_tokens: int = 40  # generated tokens at most (EOS included)
    length_penalty: float = 1.0  # finished score = summed log-prob / generated_len ** length_penalty
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice in prompt + output (0 = off)
    early_stopping: bool = False  # end a row as soon as num_beams hypotheses are finished
    num_return_sequences: int = 1  # best hypotheses returned per row (<= num_beams)

    def validate(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), got "
                             f"{self.num_return_sequences}")
        # generated_len ** length_penalty must stay a finite float (3 ** 700 already overflows).
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:  # also NaN
            raise ValueError(f"length_penalty must be between -{MAX_LENGTH_PENALTY} and {MAX_LENGTH_PENALTY} "
                             f"(typical: 0.5 .. 2), got {self.length_penalty}")


@dataclass
class Hypothesis:
    """One finished beam."""

    tokens: list[int]  # generated token ids (EOS not included)
    score: float  # summed log-probability / generated_len ** length_penalty (EOS counted in the length)
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens reached)


def banned_tokens(sequence: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `sequence` (transformers' NoRepeatNGram rule)."""
    if n < 1 or len(sequence) + 1 < n:
        return []
    tail = tuple(sequence[len(sequence) - n + 1:]) if n > 1 else ()
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i:i + n - 1]) == tail]


class BeamSearch:
    """The bookkeeping of beam search for R prompts of `num_beams` beams each; the caller runs the model.

    `advance(logits)` takes the next-token logits of the live rows' beams, row-major ((R*nb, V): row r's beams
    at r*nb .. r*nb+nb-1) and returns, for the rows still searching, which of those logits rows each new beam
    continues and the token it appends. A row whose hypotheses can no longer change leaves `live`; its best
    `num_return_sequences` hypotheses are in `results`. The engine drives one instance per request (R = 1).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], params: BeamParams, eos_ids: set[int],
                 device: torch.device | str = "cpu"):
        params.validate()
        self.params, self.eos_ids = params, set(eos_ids)
        nb, rows = params.num_beams, len(prompts)
        self.eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)
        self.k = max(2, 1 + len(self.eos_ids)) * nb  # candidates per row: enough that nb survive many EOS hits
        self.top_nb = torch.arange(self.k, device=device) < nb  # (k,) only the first nb candidates may finish
        self.prompts = [list(p) for p in prompts]
        self.live = list(range(rows))  # original row of each live row slot
        self.scores = torch.full((rows, nb), _NEG, device=device)  # running beams' summed log-probs
        self.scores[:, 0] = 0.0  # only beam 0 exists at first (its copies would give nb identical beams)
        self.beams: list[list[list[int]]] = [[[] for _ in range(nb)] for _ in range(rows)]
        self.pool_scores = torch.full((rows, nb), _NEG, device=device)  # finished hypotheses, best first
        self.pool_done = torch.zeros((rows, nb), dtype=torch.bool, device=device)
        self.pool: list[list[list[int]]] = [[[] for _ in range(nb)] for _ in range(rows)]
        self.open = torch.ones(rows, dtype=torch.bool, device=device)  # can running beams still beat the pool?
        self.results: list[list[Hypothesis]] = [[] for _ in range(rows)]
        self.step = 0

    @property
    def done(self) -> bool:
        return not self.live

    def advance(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """One step from logits (R*nb, V) -> (source row in `logits`, token) per beam of the rows still live."""
        params, nb, k = self.params, self.params.num_beams, self.k
        n_live, vocab, lp = len(self.live), logits.shape[-1], params.length_penalty
        logp = torch.log_softmax(logits.float(), dim=-1)  # (R*nb, V)
        if params.no_repeat_ngram_size:
            for slot in range(n_live * nb):
                row, beam = self.live[slot // nb], slot % nb
                banned = banned_tokens(self.prompts[row] + self.beams[slot // nb][beam], params.no_repeat_ngram_size)
                if banned:
                    logp[slot, banned] = float("-inf")
        total = logp.view(n_live, nb, vocab) + self.scores[:, :, None]  # (R, nb, V)
        cand_scores, cand_index = torch.topk(total.reshape(n_live, nb * vocab), k)  # (R, k) best first
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab  # (R, k) each
        hits = torch.isin(cand_token, self.eos) if len(self.eos) else torch.zeros_like(cand_token, dtype=torch.bool)
        if self.step + 1 >= params.max_new_tokens:
            hits = torch.ones_like(hits)
        # Running beams for the next step: the best nb candidates that did not finish.
        running = cand_scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(running, nb).indices  # (R, nb)
        scores = running.gather(1, nxt)
        # Finished hypotheses: merge the new ones (length-normalised) into the pool, keep the best nb.
        finished = cand_scores / ((self.step + 1) ** lp)
        finished = finished + (self.pool_done.all(-1, keepdim=True) & params.early_stopping).to(torch.float32) * _NEG
        finished = finished + (~self.open[:, None]).to(torch.float32) * _NEG
        did = hits & self.top_nb[None, :]
        finished = finished + (~did) * _NEG
        merged = torch.cat([self.pool_scores, finished], dim=1)  # (R, nb + k)
        keep = torch.topk(merged, nb).indices  # (R, nb)
        pool_scores = merged.gather(1, keep)
        pool_done = torch.cat([self.pool_done, did], dim=1).gather(1, keep)
        cb, ct, nx, kp = cand_beam.tolist(), cand_token.tolist(), nxt.tolist(), keep.tolist()
        beams, pool, source = self.beams, self.pool, []
        for slot in range(n_live):
            grown = [beams[slot][cb[slot][c]] + [ct[slot][c]] for c in range(k)]
            pool[slot] = [pool[slot][j] if j < nb else grown[j - nb] for j in kp[slot]]
            beams[slot] = [grown[c] for c in nx[slot]]
            source.append([slot * nb + cb[slot][c] for c in nx[slot]])
        self.step += 1
        best_running = scores[:, :1] / (self.step ** lp)
        worst_finished = torch.where(pool_done, pool_scores.min(-1, keepdim=True).values, _NEG)
        open_ = self.open & (best_running > worst_finished).any(-1)
        done = ~open_ | (pool_done.all(-1) & params.early_stopping) | hits.all(-1)
        still = []
        for slot, finished_row in enumerate(done.tolist()):
            if finished_row:
                self.results[self.live[slot]] = _hypotheses(pool[slot], pool_scores[slot].tolist(),
                                                            pool_done[slot].tolist(), self.eos_ids,
                                                            params.num_return_sequences)
            else:
                still.append(slot)
        keep_rows = torch.tensor(still, dtype=torch.long, device=scores.device)
        self.scores, self.pool_scores = scores[keep_rows], pool_scores[keep_rows]
        self.pool_done, self.open = pool_done[keep_rows], open_[keep_rows]
        self.beams, self.pool = [beams[s] for s in still], [pool[s] for s in still]
        self.live = [self.live[s] for s in still]
        return [src for s in still for src in source[s]], [beam[-1] for s in still for beam in beams[s]]


def _hypotheses(seqs: list[list[int]], scores: list[float], done: list[bool], eos_ids: set[int],
                n: int) -> list[Hypothesis]:
    out = []
    for tokens, score, ok in zip(seqs, scores, done):
        if not ok:
            continue
        stopped = bool(tokens) and tokens[-1] in eos_ids
        out.append(Hypothesis(tokens[:-1] if stopped else list(tokens), score, "stop" if stopped else "length"))
    return out[:n]


def check_beam_request(num_beams: int, max_new_tokens: int, length_penalty: float, no_repeat_ngram_size: int,
                       early_stopping: bool, temperature: float, ignore_eos: bool, guidance_scale: float | None = None,
                       num_samples: int = 1, num_return_sequences: int = 1, min_p: float = 0.0) -> BeamParams:
    """BeamParams for PrefixLM.generate, or a ValueError naming the conflicting setting and the fix."""
    if num_beams < 2:
        raise ValueError(f"no_repeat_ngram_size applies to beam search; pass num_beams >= 2 (got {num_beams})"
                         if num_beams == 1 else f"num_beams must be >= 1, got {num_beams}")
    if temperature > 0:
        raise ValueError("beam search is deterministic: pass temperature 0 with num_beams > 1 (or sample with "
                         "num_beams 1)")
    if min_p:
        raise ValueError("min_p is a sampling setting and beam search is deterministic: drop min_p or use num_beams 1")
    if ignore_eos:
        raise ValueError("ignore_eos is not supported with beam search; drop it or use num_beams 1")
    if guidance_scale is not None and guidance_scale != 1.0:
        raise ValueError("guidance is not supported with beam search; drop --guidance-scale or use num_beams 1")
    if num_samples != 1:
        raise ValueError("beam search gives one result per prompt; drop num_samples or use num_beams 1")
    params = BeamParams(num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size, early_stopping,
                        num_return_sequences)
    params.validate()
    return params
