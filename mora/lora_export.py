"""A MoRA adapter written as an exact LoRA, so that servers that run LoRA only (vLLM, llama.cpp, the multi-LoRA
servers) can run what MoRA trained.

For a variant whose branch is `decompress(M · compress(x))` with linear maps (the sharing family: sharing, types
2-4, and truncation), the update is `ΔW = D · M · C`, `C` (`r̂ × k`) the compression's matrix and `D` (`d × r̂`)
the decompression's. That is a LoRA of rank `r̂` with `B = D · M` and `A = C`, scaling 1: exact, not an
approximation. `C` and `D` are read off the variant's own maps in the registry (`C = compress(I_k)ᵀ`,
`D = decompress(I_r̂)ᵀ`), so a variant registered with maps exports with nothing added here.

Variants without such maps are refused with the reason: rope and decouple apply one (rotated) copy of `M` per
chunk of the input, a block-diagonal update of rank up to `n · r̂` that no rank-`r̂` LoRA can hold; merge them.

Every layer of the exported LoRA has the same rank `R` (the largest `r̂`; smaller layers padded with zero rows and
columns, which change nothing) and `lora_alpha = R`, so one `r` and one scaling describe the whole adapter: LoRA
servers take one rank per adapter (vLLM's `--max-lora-rank` must be at least `R`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mora import functional  # noqa: F401  (attaches the built-in variants' maps to the registry)
from mora.config import AdapterInfo, LoRAConfig
from mora.inject import adapted_layers, adapter_info
from mora.variants import VariantName, get_variant


class NotExactLoRA(ValueError):
    """A MoRA adapter whose update is not a rank-r̂ product, so no LoRA of that rank equals it."""


def lora_problem(variant: VariantName) -> Optional[str]:
    """Why a variant cannot be written as an exact LoRA of rank r̂, or None when it can."""
    spec = get_variant(variant)
    if spec.compress is not None and spec.decompress is not None:
        return None
    if spec.name in ("rope", "decouple"):
        return (f"the {spec.name} variant's update is block-diagonal (one {'rotated ' if spec.name == 'rope' else ''}"
                f"copy of M per chunk of the input), of rank up to n·r̂, not r̂: no LoRA of rank r̂ equals it; "
                f"merge it instead (format merged or gguf)")
    return (f"the {spec.name} variant has no compress and decompress maps, so its update is not known to be D·M·C "
            f"of rank r̂; merge it instead (format merged or gguf)")


def compression_matrices(variant: VariantName, in_features: int, out_features: int, side: int,
                         dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(C, D)`: the compression `C` (`r̂ × k`, `compress(x) = C x`) and decompression `D` (`d × r̂`) of a variant
    that has both maps, built by applying the maps to the identity."""
    problem = lora_problem(variant)
    if problem:
        raise NotExactLoRA(problem)
    spec = get_variant(variant)
    compress = spec.compress(torch.eye(in_features, dtype=dtype, device=device), side).T
    decompress = spec.decompress(torch.eye(side, dtype=dtype, device=device), out_features).T
    return compress.contiguous(), decompress.contiguous()


def exact_lora_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` of one MoRA layer, `A = C` (`r̂ × k`) and `B = D · M` (`d × r̂`), with `B A = ΔW`."""
    M = adapter.weight.detach()
    compress, decompress = compression_matrices(adapter.variant, adapter.in_features, adapter.out_features,
                                                adapter.r_hat, dtype=M.dtype, device=M.device)
    return compress, decompress @ M


def add_exact_lora(model: nn.Module, mora_name: str, lora_name: str) -> AdapterInfo:
    """Attach, beside the MoRA adapter `mora_name`, a LoRA adapter `lora_name` on the same layers whose update is
    exactly the MoRA update (one rank for every layer: the largest r̂), and return its info. The model's active
    adapter is left as it was; save the new one with `mora.save_adapter` (peft's LoRA format)."""
    info = adapter_info(model, mora_name)
    if info.kind != "mora":
        raise ValueError(f"adapter {mora_name!r} is {info.kind}, not MoRA: it is a LoRA already")
    problem = lora_problem(info.variant)
    if problem:
        raise NotExactLoRA(problem)
    layers = adapted_layers(model)
    rank = max(info.r_hat.values())
    factors = {path: exact_lora_factors(layers[path].adapters[mora_name]) for path in info.layers}
    config = LoRAConfig(r=rank, alpha=float(rank))
    for path, (A, B) in factors.items():
        lora = layers[path].add_adapter(lora_name, config)
        with torch.no_grad():
            lora.lora_A.zero_()
            lora.lora_A[: A.shape[0]].copy_(A.to(lora.lora_A.dtype))
            lora.lora_B.zero_()
            lora.lora_B[:, : B.shape[1]].copy_(B.to(lora.lora_B.dtype))
        lora.requires_grad_(False)
    return adapter_info(model, lora_name)


__all__ = ["NotExactLoRA", "lora_problem", "compression_matrices", "exact_lora_factors", "add_exact_lora"]
