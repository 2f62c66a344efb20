"""Prefix parameters: virtual-token embedding -> optional MLP -> keys and values for every layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prefixtune.prefix.shapes import PrefixShape

INIT_CHOICES = ("random", "zero", "text")


@dataclass
class PrefixConfig:
    """How a prefix adapter is built (the shapes themselves come from the model)."""

    num_virtual_tokens: int = 20  # virtual tokens P that every real token attends to
    prefix_projection: bool = True  # train through a 2-layer MLP (folded away after training)
    encoder_hidden_size: int | None = None  # MLP width; None = the model's hidden size
    init: str = "random"  # random | zero | text (the KV of init_text, as PEFT's initialize_kv_prefix_from_text)
    init_text: str | None = None  # text whose keys/values start the prefix when init="text"

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text (the text whose keys/values start the prefix)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flat_to_kv(flat: torch.Tensor, shape: PrefixShape) -> torch.Tensor:
    """PEFT's flat prompt_embeddings -> per-layer keys/values (index 2i = keys, 2i+1 = values of layer i)."""
    p = flat.shape[0]
    kv = flat.view(p, 2 * shape.num_layers, shape.kv_heads, shape.head_dim)  # (P, 2L, kv_heads, head_dim)
    return kv.permute(1, 2, 0, 3)  # (2L, kv_heads, P, head_dim)


def kv_to_flat(kv: torch.Tensor) -> torch.Tensor:
    """Inverse of flat_to_kv."""
    two_l, heads, p, dim = kv.shape
    return kv.permute(2, 0, 1, 3).reshape(p, two_l * heads * dim)  # (P, 2L*kv_heads*head_dim)


class PrefixEncoder(nn.Module):
    """The trainable part of one adapter; the same layout as PEFT's PrefixEncoder so weights map 1:1."""

    def __init__(self, shape: PrefixShape, config: PrefixConfig):
        super().__init__()
        config.validate()
        self.shape = shape
        self.config = config
        self.projection = config.prefix_projection
        p = config.num_virtual_tokens
        if self.projection:
            width = config.encoder_hidden_size or shape.hidden_size
            self.embedding = nn.Embedding(p, shape.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(shape.token_dim, width), nn.Tanh(), nn.Linear(width, shape.flat_dim)
            )
            if config.init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(p, shape.flat_dim)
            if config.init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def flat(self) -> torch.Tensor:
        """The prefix in PEFT's layout, differentiable."""
        if self.projection:
            return self.transform(self.embedding.weight)  # (P, 2L*kv_heads*head_dim)
        return self.embedding.weight  # (P, 2L*kv_heads*head_dim)

    def kv(self) -> torch.Tensor:
        return flat_to_kv(self.flat(), self.shape)  # (2L, kv_heads, P, head_dim)

    @torch.no_grad()
    def fold(self) -> torch.Tensor:
        """The MLP's output as a plain tensor: what inference uses and what PEFT stores."""
        return self.flat().detach().clone()

    @torch.no_grad()
    def init_from_kv(self, kv: torch.Tensor) -> None:
        """Start the prefix at given keys/values (text initialisation).

        Through a projection the MLP's output bias carries the keys/values and its last weight starts
        at zero, so the prefix starts exactly there and the MLP learns from the first step.
        """
        flat = kv_to_flat(kv).to(self.embedding.weight)  # (P, 2L*kv_heads*head_dim)
        if not self.projection:
            self.embedding.weight.copy_(flat)
            return
        if not torch.allclose(flat, flat[:1].expand_as(flat)) and flat.shape[0] > 1:
            # One bias cannot hold P different rows; the embedding rows pick them apart via the
            # first layer, so fit the last layer exactly by least squares on the hidden activations.
            width = self.transform[0].out_features
            if flat.shape[0] > width + 1:
                raise ValueError(
                    f"cannot start {flat.shape[0]} virtual tokens exactly through an MLP of width {width}: "
                    f"use --encoder-hidden-size {flat.shape[0] - 1} or more, or --no-prefix-projection"
                )
            hidden = self.transform[1](self.transform[0](self.embedding.weight))  # (P, width)
            ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
            design = torch.cat([hidden, ones], dim=1)  # (P, width + 1)
            # On the CPU: CUDA's lstsq solves only overdetermined systems, and this one is underdetermined.
            solution = torch.linalg.lstsq(design.cpu(), flat.cpu()).solution.to(flat)  # (width + 1, flat_dim)
            self.transform[2].weight.copy_(solution[:-1].T)
            self.transform[2].bias.copy_(solution[-1])
        else:
            nn.init.zeros_(self.transform[2].weight)
            self.transform[2].bias.copy_(flat[0])


@torch.no_grad()
def text_kv(model: nn.Module, tokenizer: Any, text: str, shape: PrefixShape, num_tokens: int) -> torch.Tensor:
    """Keys/values the frozen model computes for `text`, cut or repeated to `num_tokens` positions."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        raise ValueError("init_text tokenizes to nothing")
    reps = -(-num_tokens // ids.shape[1])
    ids = ids.repeat(1, reps)[:, :num_tokens].to(next(model.parameters()).device)
    out = model(input_ids=ids, use_cache=True)
    layers = []
    for layer in range(shape.num_layers):
        k, v = _layer_kv(out.past_key_values, layer)
        layers += [k[0], v[0]]  # each (kv_heads, P, head_dim)
    return torch.stack(layers).float()  # (2L, kv_heads, P, head_dim)


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]
