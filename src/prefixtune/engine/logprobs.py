"""Log-probabilities of sampled tokens and of prompt tokens (OpenAI's `logprobs`, `echo`; PrefixLM.score).

What they are: the log-softmax of the logits a row samples from, after the adapter's prefix and after the
sampler's logit stages (a guided row: the combined guided distribution, engine/guidance.py), before
temperature, top-k, top-p and min-p (which only shape the draw; greedy rows have none). A prompt token's
log-probability is the same distribution at the position before it (penalties and biases, which depend on
generated tokens, do not apply to the prompt); the prompt's first token has none.

Entries are plain tuples so they cross the engine process's pipe cheaply: `(logprob, [(token, logprob), ...])`
with the top N alternatives, best first; a prompt's first entry is None.

Cost: nothing for rows that ask for none. Prompt log-probabilities need every prompt position's logits, which
the runner's forward normally skips (`logits_to_keep=1`): for a chunk holding echo rows, `capture_hidden`
keeps the LM head's input, the head runs on the last position of every row as usual, and only the echo rows'
positions go through the head again here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from prefixtune.engine.guidance import guided_logits

Entry = tuple[float, list[tuple[int, float]]]  # (the token's logprob, top N (token, logprob), best first)


def wants_logprobs(groups) -> list:
    """The groups of `groups` whose sampled tokens carry log-probabilities."""
    return [g for g in groups if g.request.params.logprobs is not None]


def entries(logp: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]) -> list[Entry]:
    """One entry per row of logp (R, V) (log-probabilities) for tokens (R,), row i with its top tops[i]."""
    chosen = logp.gather(-1, tokens.view(-1, 1)).view(-1).tolist()  # (R,)
    width = max(tops, default=0)
    if width <= 0:
        return [(lp, []) for lp in chosen]
    values, ids = torch.topk(logp, min(width, logp.shape[-1]), dim=-1)  # (R, width)
    values, ids = values.tolist(), ids.tolist()
    return [(lp, list(zip(ids[i][:n], values[i][:n]))) for i, (lp, n) in enumerate(zip(chosen, tops))]


def sampled_entries(logits: torch.Tensor, slot: dict, groups: list, drawn: Sequence[int]) -> dict[str, Entry]:
    """Request id -> entry of the token each group in `groups` drew, from the logits (B, V) it sampled from."""
    rows = [slot[(g.request.request_id, 0)] for g in groups]
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # (G, V)
    tokens = torch.tensor([drawn[r] for r in rows], device=logits.device)
    found = entries(logp, tokens, [g.request.params.logprobs for g in groups])
    return {g.request.request_id: e for g, e in zip(groups, found)}


class capture_hidden:
    """While active, the LM head sees only each row's last position (as logits_to_keep=1 gives), and the full
    input of the forward run with logits_to_keep=0 is kept for `rows` (E,) of the batch as `hidden` (E, T, H).

    Only the thread that entered acts on the hook: the decode forward may run on another thread at the same time.
    """

    def __init__(self, model, rows: torch.Tensor):
        self.head, self.rows = model.get_output_embeddings(), rows
        self.hidden: torch.Tensor | None = None
        self._thread = threading.get_ident()

    def _hook(self, _module, args):
        if threading.get_ident() != self._thread:
            return None
        h = args[0]  # (B, T, H)
        self.hidden = h.index_select(0, self.rows)  # (E, T, H)
        return (h[:, -1:], *args[1:])  # (B, 1, H)

    def __enter__(self) -> capture_hidden:
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The CausalLM's logits (..., V) from the LM head's input (..., H), with Gemma 2/3's final soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prompt_targets(prompt: Sequence[int], done: int, n: int) -> list[int]:
    """Prompt tokens predicted by a chunk of n positions starting at prompt index `done` (the last position of
    the prompt predicts a generated token, not a prompt one)."""
    return list(prompt[done + 1:done + n + 1])


def record_prompt(model, sampler, hidden: torch.Tensor, rows: Sequence[tuple], groups: dict) -> None:
    """Append this chunk's prompt entries to each scoring request's group (Group.prompt_logprobs).

    hidden (E, T, H): the captured rows' LM-head input, left-padded as the chunk ran; rows: (key, n, prefill row)
    of each, before the chunk's n tokens are counted done. A guided request's prompt is scored by the combined
    distribution its rows sample from (both rows ran the chunk); requests that follow a leader's prefill (the
    same prompt admitted together) share its entries.
    """
    t = hidden.shape[1]
    at = {key: j for j, (key, _, _) in enumerate(rows)}
    for j, (key, n, row) in enumerate(rows):
        if key[1] != 0:
            continue
        group = groups[key[0]]
        params = group.request.params
        found = group.prompt_logprobs
        if found is None:
            found = group.prompt_logprobs = [None]  # the prompt's first token has no log-probability
        targets = prompt_targets(row.prompt, row.done, n)
        if targets:
            span = slice(t - n, t - n + len(targets))  # the positions that predict prompt tokens
            x = head_logits(model, hidden[j, span])  # (m, V)
            if params.guided:
                u = head_logits(model, hidden[at[(key[0], 1)], span])  # (m, V)
                x = guided_logits(x, u, params.guidance_scale, eos_ids=sorted(sampler.eos_ids),
                                  layout=sampler.layout())
            target = torch.tensor(targets, device=x.device)
            found += entries(torch.log_softmax(x, dim=-1), target, [params.prompt_logprobs] * len(targets))
        for follower in row.followers:
            if follower[1] == 0 and follower[0] != key[0]:
                groups[follower[0]].prompt_logprobs = found
