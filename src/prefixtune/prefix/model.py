"""A frozen causal LM with named prefix adapters; one forward serves rows of different adapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder, flat_to_kv
from prefixtune.prefix.inject import (
    allow_checkpointing_with_prefix,
    extend_inputs,
    stack_prefixes,
    training_cache,
)
from prefixtune.prefix.shapes import TESTED_MODEL_TYPES, prefix_shape

# Heads that post-process logits; the sparse-head loss would skip that, so they take the full path.
_LOGIT_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class PrefixOutput:
    loss: torch.Tensor | None  # mean token cross-entropy over labelled positions
    logits: torch.Tensor | None  # (B, T, vocab) when asked for
    num_tokens: int  # labelled tokens the loss averages over
    row_loss_sum: torch.Tensor | None = None  # (B,) summed token losses per row, for per-adapter metrics
    row_tokens: torch.Tensor | None = None  # (B,) labelled tokens per row
    row_nll: torch.Tensor | None = None  # (B,) summed token losses per row, differentiable (contrastive loss)


class PrefixModel(nn.Module):
    """Base model (frozen, never trained) + trainable PrefixEncoders keyed by adapter name."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.shape = prefix_shape(base.config)
        self.encoders = nn.ModuleDict()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.untested = self.shape.model_type not in TESTED_MODEL_TYPES

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: PrefixConfig) -> PrefixEncoder:
        if name in self.encoders:
            raise ValueError(f"adapter {name!r} already exists")
        param = next(self.base.parameters())
        # Trainable weights stay fp32 even on a bf16 base: tiny, and bf16 Adam updates round to zero.
        encoder = PrefixEncoder(self.shape, config).to(device=param.device, dtype=torch.float32)
        self.encoders[name] = encoder
        return encoder

    def prefixes(self, adapters: Sequence[str | None]) -> list[torch.Tensor | None]:
        """Each row's keys/values (2L, kv_heads, P, head_dim); an adapter's encoder runs once per batch."""
        computed: dict[str, torch.Tensor] = {}
        out: list[torch.Tensor | None] = []
        for name in adapters:
            if name is None:
                out.append(None)
                continue
            if name not in computed:
                if name not in self.encoders:
                    raise KeyError(f"unknown adapter {name!r}; known: {', '.join(self.encoders) or 'none'}")
                computed[name] = self.encoders[name].kv()
            out.append(computed[name])
        return out

    def enable_gradient_checkpointing(self) -> None:
        kwargs = {"use_reentrant": False}
        if hasattr(self.base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if allow_checkpointing_with_prefix(self.base) == 0:
            raise RuntimeError(
                "this transformers version has no checkpointing hook prefixtune knows; "
                "train without --gradient-checkpointing"
            )
        # Some backbones (GPT-2) drop the cache themselves when checkpointing: keep only the per-layer
        # flags, whose replay our idempotent cache makes safe.
        if getattr(self.base.base_model, "gradient_checkpointing", False):
            self.base.base_model.gradient_checkpointing = False
        # HF checkpoints only in train mode; zero every dropout so the frozen model stays deterministic
        # (GPT-2's attention reads its dropout rate from the module, not from the mode).
        self.base.train()
        for module in self.base.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0

    # ---- forward --------------------------------------------------------------------------------
    def run_base(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefixes: Sequence[torch.Tensor | None],
        backbone_only: bool = False,
    ):
        """One base-model call with per-row prefixes (B, T) -> model output."""
        dtype = next(self.base.parameters()).dtype
        batch = stack_prefixes(prefixes, device=input_ids.device, dtype=dtype)
        full_mask, positions = extend_inputs(batch, attention_mask)
        module = self.base.base_model if backbone_only else self.base
        return module(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=training_cache(batch),
            use_cache=False,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        adapters: Sequence[str | None] | None = None,
        labels: torch.Tensor | None = None,
        prefixes: Sequence[torch.Tensor | None] | None = None,
        return_logits: bool | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> PrefixOutput:
        """Loss on `labels` (-100 = ignore, HF convention, shifted inside) and/or full logits.

        `token_weights` (B, T), aligned with `labels`, weighs each scored token in `loss` (still divided by the
        number of scored tokens); the per-row sums stay unweighted."""
        if prefixes is None:
            prefixes = self.prefixes(adapters if adapters is not None else [None] * input_ids.shape[0])
        want_logits = labels is None if return_logits is None else return_logits
        sparse = labels is not None and not want_logits and not self._postprocessed_logits()
        if not sparse:
            logits = self.run_base(input_ids, attention_mask, prefixes).logits  # (B, T, V)
            if labels is None:
                return PrefixOutput(None, logits, 0)
            keep = labels[:, 1:] != -100
            return self._loss(logits[:, :-1][keep], labels, keep, logits if want_logits else None, token_weights)
        # Sparse head: the LM head (vocab-wide) runs only where a label is scored, not on prompt/pad tokens.
        hidden = self.run_base(input_ids, attention_mask, prefixes, backbone_only=True).last_hidden_state
        keep = labels[:, 1:] != -100
        picked = hidden[:, :-1][keep]  # (N, hidden)
        return self._loss(self.base.get_output_embeddings()(picked), labels, keep, None, token_weights)

    @staticmethod
    def _loss(scored: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, logits,
              token_weights: torch.Tensor | None = None) -> PrefixOutput:
        """Mean token loss over scored positions (N, V), plus per-row sums for per-adapter metrics."""
        token_loss = F.cross_entropy(scored.float(), labels[:, 1:][keep], reduction="none")  # (N,)
        rows = keep.nonzero()[:, 0]
        row_nll = torch.zeros(keep.shape[0], device=token_loss.device).index_add(0, rows, token_loss)
        weighted = token_loss if token_weights is None else token_loss * token_weights[:, 1:][keep]  # (N,)
        # No scored token (e.g. rows of length 1): a zero that still connects to the graph, not NaN.
        loss = weighted.mean() if token_loss.numel() else scored.sum() * 0.0
        return PrefixOutput(loss, logits, int(keep.sum()), row_nll.detach(), keep.sum(-1), row_nll)

    def _postprocessed_logits(self) -> bool:
        return any(getattr(self.base.config, name, None) for name in _LOGIT_POSTPROCESS)


def kv_from_flat(flat: torch.Tensor, model: PrefixModel) -> torch.Tensor:
    """A stored (folded) adapter as the per-row prefix the forward takes."""
    return flat_to_kv(flat, model.shape)  # (2L, kv_heads, P, head_dim)
