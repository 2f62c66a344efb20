"""Composed adapters: one request conditioned on several adapters at once ("emotion-joy+agnews-sports").

Two ways to put k adapters on one row, both selectable per request (`compose_mode`):

- `guidance` (the default, measured best: docs/BENCHMARKS.md "Composition"): a product of experts. The request
  is a group of k part rows (each its own adapter's prefix) and one row per distinct negative (a part's family
  adapter `NAME-all`, or the base model), all with the same prompt. Each step the group draws one token from

      logp = log mean_i p_part_i + sum_i scale_i * decay * (log p_part_i - log p_neg(i))

  (engine/guidance.product_logits: the parts' mixture as the anchor, also for its plausibility floor), every
  row takes it, and the group finishes together. Each part has its own scale against its own family's
  negative: by default its manifest's recommendation x COMPOSE_BOOST x ln(its label count) / ln(the largest
  label count among the parts) (part_scales). `decay` is REPEAT_DECAY ** (times the row already drew the token).
  The group also sums its *evidence*, sum_t sum_i (log p_part_i - log p_neg(i)) at each drawn token: how much its
  text says the parts' labels by the parts' own measure. It is the request's score, by which `best_of` keeps the
  best of several samples (engine/generation.py; docs/BENCHMARKS.md "Composition").
- `concat`: one row whose prefix is the parts' prefixes side by side along the virtual-token axis,
  (2L, kv_heads, P1 + P2, head_dim), prompt after them at positions P1 + P2 + j (PEFT's placement). Guided,
  like any adapter, against the concatenation of the parts' negatives when every part names one.

Adapter names never hold "+" (store.validate_name), so a composed name is unambiguous.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from prefixtune.engine.adapter_cache import CachedAdapter
from prefixtune.engine.guidance import OFF, is_guided, product_logprobs, validate_scale

SEP = "+"
MODES = ("guidance", "concat")
DEFAULT_MODE = "guidance"  # measured ahead of concat on joint accuracy (docs/BENCHMARKS.md "Composition")
MAX_COMPOSE = 4  # parts per composed adapter unless the caller sets another limit (rows grow with it)
# A part's default scale in a product of experts is its manifest's recommendation times COMPOSE_BOOST, times
# ln(its family's label count) / ln(the largest count among the parts): each part's push competes with the
# others', a label picked among more labels carries more information (6 emotions: ln 6 nats, 4 topics: ln 4),
# and at the single-adapter scale the weaker aspect is lost (docs/BENCHMARKS.md "Composition").
COMPOSE_BOOST = 2.0
# Each time a composed row has already drawn a token, that token's guidance push is multiplied by this: the
# parts' pushes otherwise keep promoting the word they favour ("loving loving loving loving"), while the
# anchor (the parts' mixture) still decides whether repeating it is natural (docs/BENCHMARKS.md, "Tuning the
# product of experts").
REPEAT_DECAY = 0.5


def part_scales(recommended: Sequence[float], labels: Sequence[int | None]) -> list[float]:
    """Each part's default scale from its recommended one and its family's label count (COMPOSE_BOOST's rule);
    a part recommending no guidance stays unguided, one with no known label set counts as the largest."""
    known = [n for n in labels if n and n > 1]
    top = max(known, default=0)
    out = []
    for rec, n in zip(recommended, labels):
        share = math.log(n) / math.log(top) if n and n > 1 else 1.0
        out.append(float(rec) * COMPOSE_BOOST * share if is_guided(rec) else float(rec))
    return out


class ComposeError(ValueError):
    """A composed adapter that cannot be built (bad name, too many parts, unknown mode, weights). `param`: the
    request field at fault (what the server's 400 names)."""

    def __init__(self, message: str, param: str = "model"):
        super().__init__(message)
        self.param = param


def is_composed(name: str | None) -> bool:
    return isinstance(name, str) and SEP in name


def parts_of(name: str | Sequence[str], limit: int | None = MAX_COMPOSE) -> list[str]:
    """The parts of "a+b" (or of a tuple of names); ComposeError for empty parts, repeats or too many parts."""
    parts = name.split(SEP) if isinstance(name, str) else list(name)
    shown = SEP.join(map(str, parts))
    if any(not isinstance(p, str) or not p.strip() for p in parts) or len(parts) < 2:
        raise ComposeError(f"composed adapter {shown!r}: name two or more adapters joined by '{SEP}' "
                           "(e.g. emotion-joy+agnews-sports)")
    if len(set(parts)) != len(parts):
        raise ComposeError(f"composed adapter {shown!r} names an adapter twice; name each part once")
    if limit is not None and len(parts) > limit:
        raise ComposeError(f"composed adapter {shown!r} has {len(parts)} parts; this limit (max_compose) is "
                           f"{limit}. Fix: compose fewer adapters or raise --max-compose")
    return parts


def check_mode(mode: str | None) -> str:
    mode = DEFAULT_MODE if mode is None else mode
    if mode not in MODES:
        raise ComposeError(f"compose_mode must be one of {', '.join(MODES)}, got {mode!r}", "compose_mode")
    return mode


def check_weights(weights: Sequence[float] | None, parts: Sequence[str]) -> list[float] | None:
    """Per-part guidance scales (None: each part's manifest recommendation); one finite number >= 0 per part."""
    if weights is None:
        return None
    weights = list(weights)
    if len(weights) != len(parts):
        raise ComposeError(f"compose_weights has {len(weights)} values for {len(parts)} adapters "
                           f"({SEP.join(parts)}); give one weight per adapter", "compose_weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise ComposeError(f"compose_weights must be finite numbers >= 0, got {w!r}", "compose_weights")
    return [float(w) for w in weights]


def concat_kv(kvs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts' folded prefixes side by side; ComposeError when their layers, heads or head size differ."""
    first = kvs[0]
    for kv in kvs[1:]:
        if kv.shape[:2] != first.shape[:2] or kv.shape[3] != first.shape[3]:
            raise ComposeError(f"cannot compose prefixes of shapes {tuple(first.shape)} and {tuple(kv.shape)}: "
                               "they must share layers, kv heads and head size (one base model)")
    return torch.cat(list(kvs), dim=2)  # (2L, kv_heads, P1 + P2 + ..., head_dim)


@dataclass(eq=False)
class Experts:
    """A product-of-experts request's rows: row i < k is part i, row k + j the j-th distinct negative."""

    parts: list[str]  # adapter names, in the composed name's order
    scales: list[float]  # each part's guidance scale against its negative
    negatives: list[str | None]  # distinct unconditioned rows (None = the base model)
    negative_of: list[int]  # per part: the index of its negative in `negatives`
    prefixes: list[torch.Tensor | None] | None = None  # folded kv per row (parts, then negatives); None: unresolved

    @property
    def rows(self) -> int:
        return len(self.parts) + len(self.negatives)

    @property
    def virtual(self) -> int:
        """The longest prefix among the rows (what max_model_len must fit)."""
        return max((0 if p is None else int(p.shape[2]) for p in self.prefixes or []), default=0)

    def spec(self) -> Experts:
        """The same experts without tensors (what crosses a process boundary; the other side resolves them)."""
        return replace(self, prefixes=None)

    def resolve(self, kv_of: Callable[[str], torch.Tensor]) -> Experts:
        """Fill `prefixes` from adapter names (kv_of(name) -> (2L, kv_heads, P, head_dim))."""
        if self.prefixes is None:
            self.prefixes = [kv_of(p) for p in self.parts] + [None if n is None else kv_of(n)
                                                              for n in self.negatives]
        return self


def experts_for(parts: Sequence[str], guides: Sequence[tuple[float, str | None]]) -> Experts:
    """Experts from each part's (scale, negative): parts sharing a negative share its row."""
    negatives: list[str | None] = []
    for _, negative in guides:
        if negative not in negatives:
            negatives.append(negative)
    return Experts(list(parts), [float(s) for s, _ in guides], negatives,
                   [negatives.index(n) for _, n in guides])


def composed_name(adapter) -> str | None:
    """A row's adapter as one name: a tuple or list of parts becomes "a+b"; a name or None stays."""
    if isinstance(adapter, (tuple, list)):
        return SEP.join(parts_of(adapter, limit=None))
    return adapter


def composed_names(adapters: Sequence, mode: str | None, limit: int | None, beam: bool = False,
                   weights: Sequence[float] | None = None) -> list:
    """Each row's adapter as one name (composed_name), the composed ones checked: parts, limit, mode."""
    names = [composed_name(a) for a in adapters]
    mode = check_mode(mode)
    if weights is not None and mode == "concat":
        raise ComposeError("compose_weights set each part's guidance scale in compose_mode 'guidance'; 'concat' "
                           "runs one row: use guidance_scale", "compose_weights")
    for name in dict.fromkeys(names):
        if is_composed(name):
            parts_of(name, limit)
            if mode == "guidance" and beam:
                raise ComposeError("a composed adapter in guidance mode samples; beam search needs "
                                   "compose_mode='concat'", "num_beams")
    return names


def check_best_of(adapters: Sequence, mode: str | None, beam: bool = False) -> None:
    """best_of ranks samples by a product of experts' evidence: every row must be composed, in guidance mode."""
    plain = [a for a in adapters if not is_composed(a)]
    if check_mode(mode) != "guidance":
        shown = "compose_mode 'concat'"
    elif beam:
        shown = "beam search"
    elif plain:
        shown = f"adapter {plain[0]!r}"
    else:
        return
    raise ComposeError(f"best_of ranks samples by a composed adapter's evidence (product of experts, "
                       f"compose_mode 'guidance'); {shown} has none. Fix: drop best_of (or use n / num_samples for "
                       "several samples)", "best_of")


def concat_adapter(lm, name: str) -> CachedAdapter:
    """The concatenated prefix of "a+b" as one cached adapter (no manifest), rebuilt when a part's file changes."""
    start = time.perf_counter()
    items = [lm.adapter(part) for part in parts_of(name, limit=None)]
    stamp = tuple(x for item in items for x in item.stamp)
    cached = lm.cache.get(name)
    if cached is not None and cached.stamp == stamp:
        return cached
    item = CachedAdapter(concat_kv([i.kv for i in items]), None, (time.perf_counter() - start) * 1000, stamp)
    lm.cache.put(name, item)
    return item


def concat_guidance(lm, name: str, scale: float | None, negative: str | None) -> tuple[float, str | None]:
    """Guidance of a concatenated row: the caller's, else the parts' mean recommended scale against their
    negatives side by side ("a-all+b-all"), or the base model when a part recommends none."""
    guides = [lm.guidance(part) for part in parts_of(name, limit=None)]
    if scale is None:
        guided = [s for s, _ in guides if is_guided(s)]
        scale = sum(guided) / len(guided) if guided else OFF
    validate_scale(scale)
    if not is_guided(scale):
        return float(scale), None
    if negative is None:
        negatives = [n for _, n in guides]  # parts of one family share their negative: it appears once
        negative = SEP.join(dict.fromkeys(negatives)) if all(negatives) else None
    elif negative.lower() == "none":
        negative = None
    if negative is not None:
        lm.adapter(negative)  # unknown or incompatible: fail now, naming it
    return float(scale), negative


def build_experts(lm, name: str, weights: Sequence[float] | None, scale: float | None,
                  negative: str | None) -> Experts:
    """The product of experts for "a+b": each part against its recommended negative (else the caller's, else
    the base model) at its weight (else the caller's scale, else part_scales from its recommended scale and its
    manifest's label count); tensors resolved."""
    parts = parts_of(name, limit=None)
    weights = check_weights(weights, parts)
    recommended, negatives = [], []
    for part in parts:
        scale_i, family = lm.guidance(part)  # (1, None) when the manifest recommends nothing
        neg = negative if negative is not None else family
        neg = None if neg is not None and neg.lower() == "none" else neg
        if neg == part:
            raise ComposeError(f"guidance_negative {neg!r} is a part of {name!r}; name another adapter")
        recommended.append(scale_i)
        negatives.append(neg)
    labels = [len(getattr(lm.manifest(p), "labels", None) or ()) for p in parts]
    scales = weights or ([scale] * len(parts) if scale is not None else part_scales(recommended, labels))
    guides = list(zip(scales, negatives))
    for s, _ in guides:
        validate_scale(s)
    return experts_for(parts, guides).resolve(lambda n: lm.adapter(n).kv)


def combine_experts(logits: torch.Tensor, slot: dict, groups: Sequence, eos_ids: Sequence[int],
                    layout: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The sampler's stage for composed groups: each group's part row gets the combined distribution.

    `logits` (B, V) of the running rows; `slot` maps a row key (request id, i) to its index. Row 0 (the first
    part) is the row the group samples from; the other rows take its token (engine/sampler.py).
    """
    if not groups:
        return logits
    mask = layout()
    firsts, combined = [], []
    for group in groups:
        request_id, experts = group.request.request_id, group.request.experts
        k = len(experts.parts)
        rows = torch.tensor([slot[(request_id, i)] for i in range(k)], device=logits.device)
        negs = torch.tensor([slot[(request_id, k + j)] for j in experts.negative_of], device=logits.device)
        scales = torch.tensor(experts.scales, device=logits.device)
        decay = None if group.counts is None else REPEAT_DECAY ** group.counts  # (V,)
        lc = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)  # (k, V)
        lu = torch.log_softmax(logits.index_select(0, negs).float(), dim=-1)  # (k, V)
        group.step_logprobs = (lc, lu)  # note_tokens reads the evidence at the drawn token from them
        combined.append(product_logprobs(lc, lu, scales, eos_ids=eos_ids, layout=mask, decay=decay))  # (V,)
        firsts.append(rows[:1])
    # One copy of the batch's logits for all groups: a copy per group cost B x V per group, quadratic in requests
    return logits.index_copy(0, torch.cat(firsts), torch.stack(combined))  # (B, V)


def note_tokens(groups: Sequence, tokens: dict[str, int], width: int, device) -> None:
    """Count each composed group's drawn token into its `counts` (V,) (what REPEAT_DECAY weighs pushes by) and
    add the token's sum_i (log p_part_i - log p_neg(i)) to its `evidence` (a token a negative masks adds 0)."""
    noted, steps = [], []
    for group in groups:
        if group.counts is None:
            group.counts = torch.zeros(width, device=device)  # (V,)
        token = tokens.get(group.request.request_id)
        if token is not None and token < width:
            group.counts[token] += 1
            lc, lu = group.step_logprobs
            step = lc[:, token] - lu[:, token]  # (k,)
            steps.append(torch.where(torch.isfinite(step), step, torch.zeros_like(step)).sum())
            noted.append(group)
        group.step_logprobs = None  # two (k, V) per group: not kept between steps
    if steps:  # one device read for every group's step
        for group, value in zip(noted, torch.stack(steps).tolist()):
            group.evidence += value


__all__ = ["COMPOSE_BOOST", "DEFAULT_MODE", "MAX_COMPOSE", "MODES", "REPEAT_DECAY", "SEP", "ComposeError", "Experts",
           "build_experts", "check_best_of", "check_mode", "check_weights", "combine_experts", "composed_name",
           "concat_adapter", "concat_guidance", "concat_kv", "experts_for", "is_composed", "note_tokens", "part_scales",
           "parts_of"]
