"""One optimizer step's gradients on this rank: its share of the step's rows, in micro-batches, under the LM loss
or the family's contrastive loss. The Trainer (train/loop.py) steps the optimizer and retries on OOM."""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch

from prefixtune.train.config import TrainConfig
from prefixtune.train.contrastive import contrastive_forward, negatives_for
from prefixtune.train.distributed import ghost_share, rank_share, sum_over_ranks
from prefixtune.train.plan import TrainPlan
from prefixtune.train.word_weights import WordWeights


class StepGradients:
    """Forward and backward of each step's batch; the loss and contrastive figures of the last step."""

    def __init__(self, cfg: TrainConfig, plan: TrainPlan, ddp_model, device: torch.device):
        self.cfg, self.plan, self.ddp_model, self.device = cfg, plan, ddp_model, device
        self.model, self.method, self.accelerator = plan.model, plan.method, plan.accelerator
        self.rank, self.processes = plan.ranks
        # Label adapters only: the family's unconditional adapter explains every label alike by design.
        self.contrast_family = [a for a, label in plan.adapter_labels.items() if label is not None
                                ] if cfg.contrastive_weight > 0 else []
        self.contrast_rng = random.Random(cfg.seed + 13)
        self.contrast_seen, self.contrast_rows = 0.0, 0  # running sum of the discriminative loss, rows
        self.word_weights = WordWeights(plan.word_tokens, cfg.label_word_weight, plan.loaded.model.config.vocab_size
                                        ) if plan.word_tokens else None

    def accumulate(self, batch, step: int, micro: int) -> tuple[float, int]:
        """Forward/backward in micro-batches of `micro` rows, each weighted by its share of the step's labelled
        tokens; returns the step's per-token loss and its labelled tokens.

        Under DDP every rank holds the step's whole batch and computes its share of the rows; DDP averages the
        ranks' gradients, so each rank scales its loss by the processes: the result is the global per-token
        mean, as one process computes it. Only the last micro-batch synchronises gradients."""
        # Negatives are drawn from a stream seeded by the step: a resumed run, an OOM retry and every DDP
        # split draw the same ones.
        self.contrast_rng.seed(self.cfg.seed * 1_000_003 + step)
        self.contrast_seen, self.contrast_rows = 0.0, 0
        total, rows = int((batch.labels[:, 1:] != -100).sum()), len(batch.adapters)
        start, stop = rank_share(rows, self.processes, self.rank)
        for adapter in batch.adapters[:start] if self.contrast_family else ():  # earlier ranks' draws
            if adapter in self.contrast_family:
                negatives_for(adapter, self.contrast_family, self.cfg.contrastive_negatives, self.contrast_rng)
        ghost = stop == start
        mine = ghost_share(batch) if ghost else batch.rows(start, stop)
        firsts = range(0, len(mine.adapters), micro)
        loss_sum = 0.0
        for first in firsts:
            part = mine.rows(first, first + micro)
            last = first == firsts[-1]
            with nullcontext() if last or not self.plan.ddp else self.accelerator.no_sync(self.ddp_model):
                if self.contrast_family and not ghost:
                    loss_sum += self._contrastive_part(part, total, rows)
                else:
                    loss_sum += self._lm_part(part, total)
        if self.processes > 1:
            loss_sum, self.contrast_seen, self.contrast_rows = sum_over_ranks(
                self.accelerator, [loss_sum, self.contrast_seen, self.contrast_rows])
        return loss_sum / max(total, 1), total

    def _lm_part(self, part, total_tokens: int) -> float:
        labels = part.labels.to(self.device)
        weights = None if self.word_weights is None else self.word_weights(part.adapters, labels)  # (B, T)
        with self._autocast():
            out = self.ddp_model(
                part.input_ids.to(self.device), part.attention_mask.to(self.device),
                adapters=self.method.row_adapters(part.adapters), labels=labels, token_weights=weights,
            )
        self.accelerator.backward(out.loss * (out.num_tokens / max(total_tokens, 1) * self.processes))
        # The logged loss is the plain one (row sums are never weighted), comparable with eval loss and other runs.
        return float(out.row_loss_sum.sum())

    def _contrastive_part(self, part, total_tokens: int, total_rows: int) -> float:
        """LM loss (token-weighted, as without the option) + weight x the family's discriminative loss."""
        with self._autocast():
            parts = contrastive_forward(self.ddp_model, part, self.contrast_family, self.cfg.contrastive_negatives,
                                        self.contrast_rng, self.device)
        loss = parts.lm_sum / max(total_tokens, 1) + self.cfg.contrastive_weight * parts.contrast_sum / total_rows
        self.accelerator.backward(loss * self.processes)
        self.contrast_seen += float(parts.contrast_sum.detach())
        self.contrast_rows += parts.contrasted
        return float(parts.lm_sum.detach())

    def _autocast(self):
        dtype = next(self.model.base.parameters()).dtype
        if self.device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=dtype)
        # --autocast bf16 on a CPU: the frozen model's matmuls run in bf16 while the prefix parameters, their
        # gradients and AdamW's state stay float32 (the master weights); eval runs without it.
        cpu_bf16 = self.device.type == "cpu" and dtype == torch.float32 and self.cfg.autocast == "bf16"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)
