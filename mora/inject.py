"""Attaching adapters to a model: find the target layers, wrap them, freeze the base, and manage adapters by name.

Works on any torch model (transformers causal LMs in particular) in place, the way a peft user expects:
`add_adapter(model, "uuid-mora", MoRAConfig(r=8))`, train, `save_adapter(...)`, `merge_and_unload(model)`.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from torch import nn

from mora.config import AdapterConfig, AdapterInfo, TargetModules
from mora.layers import AdaptedLinear, is_adaptable

# A path segment that is a number marks a layer inside the model's repeated blocks (layers.0.self_attn.q_proj).
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def _output_embedding_paths(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {path for path, module in model.named_modules() if head is not None and module is head}


def matches_target(path: str, target_modules: TargetModules) -> bool:
    """peft's rule: a regex string must match the whole path; a list entry must equal a dotted suffix of it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == name or path.endswith("." + name) for name in target_modules)


def candidate_layers(model: nn.Module) -> list[str]:
    """Paths of every layer an adapter could go on: linear layers and already adapted ones, never the wrapped base
    layer or an adapter's own modules."""
    return [path for path, module in model.named_modules()
            if not _inside_adapted(path) and (isinstance(module, AdaptedLinear) or is_adaptable(module))]


def find_target_modules(model: nn.Module, target_modules: TargetModules = None) -> list[str]:
    """Paths of the layers an adapter goes on; by default every linear layer in the repeated blocks, never the
    LM head or the embeddings (the paper adapts attention and MLP projections)."""
    heads = _output_embedding_paths(model)
    found = []
    for path in candidate_layers(model):
        if target_modules is None:
            wanted = _BLOCK_INDEX.search(path) is not None and path not in heads
        else:
            wanted = matches_target(path, target_modules)
        if wanted:
            found.append(path)
    if not found:
        wanted = "the default targets (linear layers inside repeated blocks)" if target_modules is None else repr(
            target_modules)
        raise ValueError(f"no linear layer of {type(model).__name__} matches {wanted}")
    return found


def _inside_adapted(path: str) -> bool:
    """The wrapped base layer and the adapters' own modules are never targets themselves."""
    return path.endswith(".base_layer") or ".adapters." in path


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def add_adapter(model: nn.Module, name: str, config: AdapterConfig, activate: bool = True) -> AdapterInfo:
    """Attach a new adapter under `name` to every target layer, freeze the base, and (by default) activate it."""
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and contain no '.', got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    for path in find_target_modules(model, config.target_modules):
        layer = model.get_submodule(path)
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer)
            replace_module(model, path, layer)
        layer.add_adapter(name, config)
    if activate or active_adapter(model) is None:
        set_active_adapter(model, name)
    else:
        _freeze_all_but(model, active_adapter(model))
    return adapter_info(model, name)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> Optional[str]:
    actives = {layer.active_adapter for layer in adapted_layers(model).values()} - {None}
    return next(iter(actives)) if len(actives) == 1 else None


def _require(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        known = ", ".join(adapter_names(model)) or "none"
        raise KeyError(f"the model has no adapter named {name!r} (adapters: {known})")


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make `name` the adapter that forward uses and training updates (None: the base model alone)."""
    if name is not None:
        _require(model, name)
    for layer in adapted_layers(model).values():
        layer.active_adapter = name if name in layer.adapters else None
    _freeze_all_but(model, name)


def _freeze_all_but(model: nn.Module, name: Optional[str]) -> None:
    """Only the active adapter's weights train; the base and every other adapter stay frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if name is None:
        return
    for layer in adapted_layers(model).values():
        if name in layer.adapters:
            for parameter in layer.adapters[name].parameters():
                parameter.requires_grad_(True)


@contextmanager
def adapters_per_row(model: nn.Module, rows: Sequence[Optional[str]]) -> Iterator[None]:
    """Within the block, batch row i uses adapter `rows[i]` (None: base only), so one forward (or one `generate`)
    answers with several adapters side by side on a single copy of the base."""
    for name in dict.fromkeys(n for n in rows if n is not None):
        _require(model, name)
    layers = adapted_layers(model).values()
    try:
        for layer in layers:
            layer.set_row_adapters([n if n in layer.adapters else None for n in rows])
        yield
    finally:
        for layer in layers:
            layer.set_row_adapters(None)


def merge_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    """Add the adapter's ΔW into each base weight (default: the active adapter); the model then runs at base speed."""
    name = name or active_adapter(model)
    if name is None:
        raise ValueError("no adapter to merge: name one or activate one first")
    _require(model, name)
    for layer in adapted_layers(model).values():
        if name in layer.adapters:
            layer.merge([name])


def unmerge_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    """Subtract merged adapters from the base weights again (default: all that are merged)."""
    for layer in adapted_layers(model).values():
        layer.unmerge([name] if name is not None else None)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete an adapter everywhere; layers left with no adapter become their plain base layer again."""
    _require(model, name)
    for path, layer in adapted_layers(model).items():
        if name in layer.adapters:
            layer.remove_adapter(name)
        if not len(layer.adapters):
            replace_module(model, path, layer.base_layer)
    _freeze_all_but(model, active_adapter(model))


def merge_and_unload(model: nn.Module, names: Optional[Sequence[str]] = None) -> nn.Module:
    """Merge the named adapters (default: the active one) for good and return the plain model, wrappers gone."""
    chosen = list(names) if names is not None else [n for n in [active_adapter(model)] if n is not None]
    for name in chosen:
        _require(model, name)
    for path, layer in adapted_layers(model).items():
        layer.unmerge([n for n in layer.merged_adapters if n not in chosen])
        layer.merge([n for n in chosen if n in layer.adapters])
        replace_module(model, path, layer.base_layer)
    return model


def count_parameters(model: nn.Module) -> ParameterCount:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCount(trainable=trainable, total=sum(p.numel() for p in model.parameters()))


def adapter_info(model: nn.Module, name: str) -> AdapterInfo:
    """What the adapter is and what it costs, beside LoRA's budget at the same r (the spec asks to show both)."""
    _require(model, name)
    info: Optional[AdapterInfo] = None
    for path, layer in adapted_layers(model).items():
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None:
            continue
        if info is None:
            info = AdapterInfo(
                name=name, kind=adapter.kind, r=adapter.r, variant=getattr(adapter, "variant", None),
                alpha=getattr(adapter, "alpha", None), use_rslora=getattr(adapter, "use_rslora", False),
                dropout=adapter.dropout_p,
            )
        info.layers.append(path)
        info.trainable_parameters += sum(p.numel() for p in adapter.parameters())
        info.lora_equivalent_parameters += adapter.lora_equivalent_parameters()
        if adapter.kind == "mora":
            info.r_hat[path] = adapter.r_hat
    assert info is not None
    return info
