"""mora: MoRA and LoRA adapters for any PyTorch / transformers model.

    from mora import MoRAConfig, add_adapter, save_adapter
    add_adapter(model, "memorise", MoRAConfig(r=8))      # rope at r ≤ 32, sharing above
    ...train...
    save_adapter(model, "memorise", "out/memorise")

The package imports torch and safetensors only: it knows nothing of the studio around it.
"""
from mora.config import AdapterConfig, AdapterInfo, LoRAConfig, MoRAConfig
from mora.diagnostics import LayerSpectrum, delta_spectrum, effective_rank, effective_rank_summary
from mora.functional import default_variant, mora_delta_weight, mora_forward, r_hat
from mora.inject import (
    ParameterCount,
    active_adapter,
    adapted_layers,
    adapter_info,
    adapter_names,
    adapters_per_row,
    add_adapter,
    count_parameters,
    find_target_modules,
    merge_adapter,
    merge_and_unload,
    remove_adapter,
    set_active_adapter,
    unmerge_adapter,
)
from mora.io import AdapterFormatError, load_adapter, read_adapter_config, save_adapter
from mora.layers import AdaptedLinear, LoRAAdapter, MoRAAdapter
from mora.remora import remora_step, reset_optimizer_state

__all__ = [
    "AdaptedLinear", "AdapterConfig", "AdapterFormatError", "AdapterInfo", "LayerSpectrum", "LoRAAdapter",
    "LoRAConfig", "MoRAAdapter", "MoRAConfig", "ParameterCount", "active_adapter", "adapted_layers", "adapter_info",
    "adapter_names", "adapters_per_row", "add_adapter", "count_parameters", "default_variant", "delta_spectrum",
    "effective_rank", "effective_rank_summary", "find_target_modules", "load_adapter", "merge_adapter",
    "merge_and_unload", "mora_delta_weight", "mora_forward", "r_hat", "read_adapter_config", "remora_step",
    "remove_adapter", "reset_optimizer_state", "save_adapter", "set_active_adapter", "unmerge_adapter",
]
