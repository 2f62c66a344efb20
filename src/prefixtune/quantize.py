"""Weight-only int8 quantization of the frozen base model for serving (torchao's `Int8WeightOnlyConfig`).

Single-stream decode on a CPU reads every weight once per token, so its speed is bound by the bytes of the
weights: int8 weights are a quarter of float32's. Only the frozen base is quantized: prefixes stay keys and
values in the model's dtype, and the fingerprint adapters check is the float model's (computed at load, before
this), so an adapter trained on the float base serves on the quantized one. The drift this costs (greedy
agreement, eval loss of such an adapter) is measured in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from prefixtune.errors import UserError

QUANTIZE_CHOICES = ("int8",)


class QuantizeError(UserError, ValueError):
    """An unknown --quantize value, or the quantization library is missing."""


def check_quantize(mode: str | None) -> str | None:
    """`mode` normalised (None/"none" = off); an unknown one is an error naming the choices."""
    if mode is None or mode.lower() in ("", "none", "off"):
        return None
    if mode.lower() not in QUANTIZE_CHOICES:
        raise QuantizeError(f"unknown --quantize {mode!r}; choose one of {', '.join(QUANTIZE_CHOICES)} or none")
    return mode.lower()


def quantize_model(model, mode: str | None):
    """Quantize `model`'s linear layers in place (None: leave it as it is); returns the model."""
    mode = check_quantize(mode)
    if mode is None:
        return model
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantizeError("--quantize int8 needs torchao; fix: pip install torchao==0.18.0") from None
    # The LM head is a Linear too, and the largest one in a small model (SmolLM2: 28M of 135M weights); when it
    # shares its weight with the input embedding the embedding keeps the float copy.
    quantize_(model, Int8WeightOnlyConfig())
    model.config.prefixtune_quantized = mode  # so reports can say what ran
    return model
