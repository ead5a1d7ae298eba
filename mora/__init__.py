"""mora: MoRA and LoRA adapters for any PyTorch / transformers model.

    from mora import MoRAConfig, add_adapter, save_adapter
    add_adapter(model, "memorise", MoRAConfig(r=8))      # rope at r ≤ 32, sharing above
    ...train...
    save_adapter(model, "memorise", "out/memorise")

The package imports torch and safetensors only: it knows nothing of the studio around it. Its names load lazily
(PEP 562), so `mora.variants`, which needs no torch, can be imported where torch must not be (a web process checking
a training config); the first name that needs torch imports it.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "mora.config": ("AdapterConfig", "AdapterInfo", "LoRAConfig", "MoRAConfig"),
    "mora.diagnostics": ("LayerSpectrum", "delta_spectrum", "effective_rank", "effective_rank_summary"),
    "mora.functional": ("mora_delta_weight", "mora_forward"),
    "mora.inject": ("ParameterCount", "active_adapter", "adapted_layers", "adapter_info", "adapter_names",
                    "adapters_per_row", "add_adapter", "count_parameters", "find_target_modules", "merge_adapter",
                    "merge_and_unload", "remove_adapter", "set_active_adapter", "unmerge_adapter"),
    "mora.io": ("AdapterFormatError", "load_adapter", "read_adapter_config", "save_adapter"),
    "mora.layers": ("AdaptedLinear", "LoRAAdapter", "MoRAAdapter"),
    "mora.lora_export": ("NotExactLoRA", "add_exact_lora", "lora_problem"),
    "mora.remora": ("remora_step", "reset_optimizer_state"),
    "mora.variants": ("VariantSpec", "default_variant", "r_hat", "register_variant", "unregister_variant",
                      "variant_names"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("config", "diagnostics", "functional", "fused", "inject", "io", "layers", "lora_export", "remora",
               "variants")

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        if _HOME[name] != "mora.variants":
            importlib.import_module("mora.functional")  # the built-in variants' parts attach on its import
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mora.{name}")
    raise AttributeError(f"module 'mora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
