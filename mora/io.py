"""Saving and loading adapters in the folder layout peft users know: `adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module path>.lora_A.weight`.

- LoRA is written exactly as peft writes it, so `peft.PeftModel.from_pretrained` loads ours and we load peft's.
- MoRA is written as the authors' peft fork reads it (`use_mora`, `mora_type`, the user's `r`), but M is stored
  once, under `lora_A`; the reference's own folders, where `lora_A` and `lora_B` both hold M, load too.
- Loading never unpickles: safetensors only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mora import variants
from mora.config import LoRAConfig, MoRAConfig
from mora.inject import (adapted_layers, adapter_info, adapter_names, candidate_layers, matches_target,
                         replace_module, set_active_adapter)
from mora.layers import AdaptedLinear, MoRAAdapter, layer_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """An adapter folder we cannot load, with what was found and what was expected."""


def _target_modules_for(model: nn.Module, paths: list[str]) -> Union[list[str], str]:
    """Module names for peft's config: short names when they select exactly our layers, else an exact-path regex."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p in candidate_layers(model) if matches_target(p, names)}
    if selected == set(paths):
        return names
    return "|".join(re.escape(p) for p in paths)


def save_adapter(model: nn.Module, name: str, folder: Union[str, Path], base_model_name_or_path: str = "") -> Path:
    """Write one adapter to `folder` (created if needed) and return the folder."""
    info = adapter_info(model, name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = adapted_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for path in info.layers:
        adapter = layers[path].adapters[name]
        if info.kind == "mora":
            tensors[f"{PREFIX}{path}.lora_A.weight"] = adapter.weight.detach().contiguous().cpu()
        else:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = adapter.lora_A.detach().contiguous().cpu()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = adapter.lora_B.detach().contiguous().cpu()
    any_transposed = any(layers[p].transposed for p in info.layers)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": info.r,
        "lora_alpha": info.alpha if info.kind == "lora" else info.r,
        "lora_dropout": info.dropout,
        "use_rslora": info.use_rslora,
        "target_modules": _target_modules_for(model, info.layers),
        "fan_in_fan_out": any_transposed,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    if info.kind == "mora":  # peft cannot load MoRA anyway, so only MoRA configs carry our own fields
        config.update(use_mora=True, mora_type=variants.reference_type(info.variant),
                      mora_studio={"format_version": FORMAT_VERSION, "variant": info.variant})
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder: Union[str, Path]) -> dict:
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def _read_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise AdapterFormatError(f"{folder}: no {WEIGHTS_NAME}{hint}")
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"{weights_file}: unexpected tensor {key!r}; expected '<module>.lora_A.weight'")
        per_layer.setdefault(match["path"], {})[match["part"]] = tensor
    if not per_layer:
        raise AdapterFormatError(f"{weights_file}: holds no adapter tensors")
    return per_layer


def _alpha_for(path: str, config: dict) -> float:
    """peft's `alpha_pattern`: a per-module override of lora_alpha, keyed by a name regex."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    return float(config.get("lora_alpha", config.get("r", 8)))


def load_adapter(
    model: nn.Module, folder: Union[str, Path], name: Optional[str] = None, activate: bool = True
) -> str:
    """Load an adapter folder (ours, peft's LoRA, or the MoRA reference's) onto `model` under `name` (default: the
    folder's name) and return the name. The tensors must fit the model's layers; every mismatch is named."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    name = name or folder.resolve().name
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported (LoRA and MoRA are)")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{folder}: DoRA adapters are not supported")
    per_layer = _read_weights(folder)
    is_mora = bool(config.get("use_mora"))
    studio = config.get("mora_studio") or {}
    if is_mora:
        variant = variants.normalize_variant(studio.get("variant") or config.get("mora_type") or 1)
    r = int(config.get("r", 8))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    paths = list(per_layer)
    available = set(candidate_layers(model))
    missing = [p for p in paths if p not in available]
    if missing:
        raise AdapterFormatError(f"{folder}: the model has no linear layer {missing[0]!r} ({len(missing)} missing)")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    for path in paths:  # validate everything first, so a bad folder leaves the model untouched
        _validate_layer(model.get_submodule(path), path, per_layer[path], is_mora, folder)
    for path in paths:
        parts = per_layer[path]
        layer = model.get_submodule(path)
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer)
            replace_module(model, path, layer)
        if is_mora:
            _load_mora_layer(layer, name, parts, MoRAConfig(r=r, variant=variant, dropout=dropout))
        else:
            lora = LoRAConfig(r=parts["A"].shape[0], alpha=_alpha_for(path, config), dropout=dropout,
                              use_rslora=bool(config.get("use_rslora", False)))
            _load_lora_layer(layer, name, parts, lora)
    if activate:
        set_active_adapter(model, name)
    return name


def _validate_layer(module: nn.Module, path: str, parts: dict, is_mora: bool, folder: Path) -> None:
    in_features, out_features = layer_features(module)
    where = f"{folder}: {path}"
    if is_mora:
        M = parts.get("A", parts.get("B"))
        if "A" in parts and "B" in parts and not torch.equal(parts["A"], parts["B"]):
            raise AdapterFormatError(f"{where}: lora_A and lora_B differ; a MoRA folder holds M in both")
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise AdapterFormatError(f"{where}: MoRA's M must be square, found shape {tuple(M.shape)}")
        return
    if set(parts) != {"A", "B"}:
        raise AdapterFormatError(f"{where}: a LoRA layer needs lora_A and lora_B, found {sorted(parts)}")
    rank = parts["A"].shape[0]
    for part, expected in (("A", (rank, in_features)), ("B", (out_features, rank))):
        if tuple(parts[part].shape) != expected:
            raise AdapterFormatError(
                f"{where}.lora_{part}: shape {tuple(parts[part].shape)} does not fit this model, expected {expected}")


def _load_mora_layer(layer: AdaptedLinear, name: str, parts: dict, config: MoRAConfig) -> None:
    M = parts.get("A", parts.get("B"))
    adapter = MoRAAdapter(layer.in_features, layer.out_features, config, device=layer.weight.device, r_hat=M.shape[0])
    layer.attach(name, adapter)
    with torch.no_grad():
        adapter.weight.copy_(M.to(adapter.weight.dtype))


def _load_lora_layer(layer: AdaptedLinear, name: str, parts: dict, config: LoRAConfig) -> None:
    adapter = layer.add_adapter(name, config)
    with torch.no_grad():
        adapter.lora_A.copy_(parts["A"].to(adapter.lora_A.dtype))
        adapter.lora_B.copy_(parts["B"].to(adapter.lora_B.dtype))
