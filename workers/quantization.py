"""Quantised bases (QLoRA, and QMoRA: the same with MoRA): the frozen base held in 4-bit NormalFloat with double
quantisation (`nf4`) or in 8-bit (`int8`) by bitsandbytes through transformers' BitsAndBytesConfig, the adapters in
float32 on top.

mora's AdaptedLinear wraps bitsandbytes' `Linear4bit` and `Linear8bitLt` as it wraps any `nn.Linear` (they are
subclasses): the base forward goes through the quantised kernels, which compute in the run's bfloat16/float16, and
the adapter branch adds its float32 result on top. A quantised weight cannot take a merge in place, so a merged
export first dequantises the base (`dequantize_model`): the export is exactly the function that trained, W0 as the
quantised base held it plus ΔW, in the compute dtype.

bitsandbytes' 4-bit and 8-bit layers need a CUDA GPU; where there is none, or bitsandbytes is missing, a run that asks
for a quantised base fails before loading anything, with the reason (`backend_problem`).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Optional

BNB_VERSION = "0.50.2"
DEQUANTIZERS: dict[str, Callable[[Any], Any]] = {}
"""Dequantised float weight (`out × in`) of a quantised linear layer, by the layer's class name."""


class QuantizationError(ValueError):
    """A quantised base that cannot be had here, with why."""


def backend_problem() -> Optional[str]:
    """Why this process cannot hold a quantised base, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return ("no CUDA GPU here: bitsandbytes' 4-bit and 8-bit layers run on a CUDA GPU (a CPU worker trains "
                "with quantization none)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"bitsandbytes is not installed: pip install bitsandbytes=={BNB_VERSION} on this worker"
    return None


def require_backend(kind: str) -> None:
    problem = backend_problem()
    if problem:
        raise QuantizationError(f"quantization {kind}: {problem}")


def bnb_config(kind: str, compute_dtype):
    """transformers' BitsAndBytesConfig for `kind` ("nf4" or "int8"), computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizationError(f"quantization: expected nf4 or int8, got {kind!r}")


def _dequantize_4bit(layer):
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _dequantize_8bit(layer):
    weight = layer.weight
    if getattr(weight, "SCB", None) is None:  # not quantised yet (never moved to the GPU): still the float weight
        return weight.data
    return weight.CB.float() * weight.SCB.float().unsqueeze(1) / 127.0


DEQUANTIZERS.update(Linear4bit=_dequantize_4bit, Linear8bitLt=_dequantize_8bit)


def is_quantized_linear(module) -> bool:
    return type(module).__name__ in DEQUANTIZERS


def dequantized_linear(layer, dtype):
    """A plain `nn.Linear` holding `layer`'s weight as its quantisation holds it, in `dtype`, on its device."""
    import torch
    from torch import nn

    weight = DEQUANTIZERS[type(layer).__name__](layer).to(dtype)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                      dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.to(dtype))
    return plain.requires_grad_(False)


def dequantize_model(model, dtype) -> int:
    """Replace every quantised linear layer of `model` (inside mora's adapted layers too) by its dequantised plain
    layer, so adapters can be merged and the model saved as an ordinary one; returns how many were replaced."""
    from mora.inject import replace_module

    quantized = [path for path, module in model.named_modules() if is_quantized_linear(module)]
    for path in quantized:
        replace_module(model, path, dequantized_linear(model.get_submodule(path), dtype))
    if quantized:  # an ordinary model again, which save_pretrained writes as such
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.__dict__.pop("_hf_peft_config_loaded", None)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return len(quantized)
