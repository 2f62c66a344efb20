"""A quantized frozen base model for serving on CPUs: torch's dynamic quantization (fbgemm / x86 kernels).

Single-stream decode on a CPU reads every weight once per token, so its speed is bound by the bytes of the
weights. Two modes, both `torch.ao.quantization.quantize_dynamic` over the model's linear layers, the only
int8/fp16 GEMM kernels in torch that beat float32 on an AVX2 CPU (torchao's int8 weight-only and `_int_mm` fall
back to reference loops there and run 0.2x float32; measured in docs/BENCHMARKS.md):

- `int8`: int8 weights (one scale per output channel) and activations quantized per call (one scale per tensor),
  an int8 GEMM. The fastest, but the per-tensor activation scale costs accuracy on small LLMs, whose
  activations have a few very large channels: the drift is measured in docs/BENCHMARKS.md. The LM head keeps
  fp16 weights (int8 there moves the argmax most for the least time).
- `fp16`: fp16 weights, float32 math (fbgemm's fp16 GEMM): half the bytes, no measurable drift.

Only the frozen base is quantized: prefixes stay keys and values in the model's dtype, and the fingerprint
adapters check is the float model's (computed at load, before this), so an adapter trained on the float base
serves on the quantized one.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from prefixtune.errors import UserError

QUANTIZE_CHOICES = ("int8", "fp16")
_ENGINES = ("x86", "fbgemm")  # torch's quantized CPU engines with the dynamic linear kernels, best first


class QuantizeError(UserError, ValueError):
    """An unknown --quantize value, or no quantized kernels for this device."""


def check_quantize(mode: str | None) -> str | None:
    """`mode` normalised (None/"none" = off); an unknown one is an error naming the choices."""
    if mode is None or mode.lower() in ("", "none", "off"):
        return None
    if mode.lower() not in QUANTIZE_CHOICES:
        raise QuantizeError(f"unknown --quantize {mode!r}; choose one of {', '.join(QUANTIZE_CHOICES)} or none")
    return mode.lower()


def _engine(device: torch.device) -> str:
    """The quantized engine to run on, or a QuantizeError saying why there is none."""
    if device.type != "cpu":
        raise QuantizeError(f"--quantize runs torch's CPU kernels (fbgemm), not on {device.type}; fix: drop "
                            f"--quantize or pass --device cpu")
    engine = next((e for e in _ENGINES if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        raise QuantizeError(f"--quantize needs torch's fbgemm/x86 quantized engine, which this torch build lacks "
                            f"(it has: {', '.join(torch.backends.quantized.supported_engines) or 'none'}); fix: "
                            f"install the official x86-64 torch wheel, or drop --quantize")
    return engine


def quantize_model(model: nn.Module, mode: str | None) -> nn.Module:
    """Quantize `model`'s linear layers in place (None: leave it as it is); returns the model."""
    mode = check_quantize(mode)
    if mode is None:
        return model
    torch.backends.quantized.engine = _engine(next(model.parameters()).device)
    from torch.ao.quantization import float16_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    spec = {name: float16_dynamic_qconfig if mode == "fp16" or module is head else per_channel_dynamic_qconfig
            for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with warnings.catch_warnings():  # torch.ao's deprecation notices, once per layer: the kernels are current
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        # A tied LM head is replaced by its quantized copy; the input embedding keeps the float weight.
        quantize_dynamic(model, spec, inplace=True)
    model.config.prefixtune_quantized = mode  # so reports can say what ran
    if mode == "int8":
        print("prefixtune: --quantize int8 quantizes activations with one scale per batch: outputs drift (SmolLM2: "
              "eval loss +0.96) and a row's tokens depend on the rows beside it; --quantize fp16 keeps float32's "
              "outputs (docs/BENCHMARKS.md, 'Quantized base')", file=sys.stderr)
    return model
