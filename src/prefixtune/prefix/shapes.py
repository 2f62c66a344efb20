"""Prefix shapes derived from a Hugging Face model config, never asked from the user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefixtune.errors import UserError

# Architectures the test matrix covers; others load with a warning if their structure is plain.
TESTED_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma"})


class UnsupportedModelError(UserError, ValueError):
    """The model's attention layout cannot take a per-layer key/value prefix."""


class ShapeMismatchError(UserError, ValueError):
    """A user-given or stored size disagrees with the base model."""


@dataclass(frozen=True)
class PrefixShape:
    """Where a prefix goes: one key and one value block per layer."""

    num_layers: int  # decoder layers that get a prefix
    kv_heads: int  # key/value heads per layer (GQA: fewer than attention heads)
    head_dim: int  # size of one head
    hidden_size: int  # the model's hidden size (default width of the prefix MLP)
    model_type: str  # config.model_type, for messages

    @property
    def token_dim(self) -> int:
        """Width of one layer's keys for one virtual token (PEFT's `token_dim`)."""
        return self.kv_heads * self.head_dim

    @property
    def flat_dim(self) -> int:
        """Width of one row of PEFT's `prompt_embeddings`: keys and values of every layer."""
        return 2 * self.num_layers * self.token_dim

    def describe(self) -> str:
        return (
            f"{self.model_type}: {self.num_layers} layers x {self.kv_heads} kv heads x head_dim {self.head_dim}"
        )


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def prefix_shape(config: Any) -> PrefixShape:
    """Read layers, KV heads and head size from any decoder config (GPT-2 names included)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", "unknown")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{model_type} is an encoder-decoder model; prefixtune trains prefixes for decoder-only causal LMs."
        )
    # Heterogeneous layers (Gemma 4 style global/sliding shapes, KV sharing, linear attention) need a
    # different prefix per layer shape; refuse clearly instead of injecting into a subset of layers.
    # (`per_layer_config` is a property on new configs; only the serialized overrides say heterogeneous.)
    raw = config.to_dict() if hasattr(config, "to_dict") else {}
    if raw.get("global_head_dim") or raw.get("per_layer_config") or raw.get("num_kv_shared_layers"):
        raise UnsupportedModelError(
            f"{model_type} mixes layers with different key/value shapes; prefixtune supports models whose "
            "layers all share one KV shape (GPT-2, Llama, Mistral, Qwen2/3, Gemma, ...)."
        )
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if "attention" not in str(t)})
    if odd:
        raise UnsupportedModelError(
            f"{model_type} has non-attention layers ({', '.join(odd)}); a KV prefix cannot reach them."
        )
    num_layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    if not (num_layers and heads and hidden):
        raise UnsupportedModelError(
            f"cannot read layers/heads/hidden size from the {model_type} config; not a supported decoder layout."
        )
    kv_heads = _first(config, "num_key_value_heads", "n_kv_heads", "multi_query_group_num") or heads
    head_dim = _first(config, "head_dim") or hidden // heads
    return PrefixShape(int(num_layers), int(kv_heads), int(head_dim), int(hidden), str(model_type))


def check_size(name: str, given: int | None, expected: int, shape: PrefixShape) -> int:
    """Accept a user/stored size only when it matches the model, else say the right value."""
    if given is not None and int(given) != expected:
        raise ShapeMismatchError(
            f"{name}={given} does not match the base model ({shape.describe()}): it must be {expected}. "
            f"Leave {name} unset and prefixtune derives it from the model config."
        )
    return expected
