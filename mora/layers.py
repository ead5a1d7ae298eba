"""The adapted layer: a frozen linear layer plus any number of named MoRA or LoRA adapters.

One wrapper serves `nn.Linear` and transformers' GPT-2 style `Conv1D` (weight stored transposed, `in × out`);
it never imports transformers, it recognises Conv1D by its shape and name. Each adapter is a small module that
knows its own hyperparameters, so saving, merging and diagnostics read everything from the layers themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from mora import functional as MF
from mora.config import AdapterConfig, LoRAConfig, MoRAConfig
from mora.variants import get_variant


class MoRAAdapter(nn.Module):
    """`f_decomp(M · f_comp(dropout(x)))`, with M (`r̂ × r̂`) starting at zero so the model starts as the base."""

    kind = "mora"

    def __init__(
        self, in_features: int, out_features: int, config: MoRAConfig, device=None, r_hat: Optional[int] = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r = config.r
        self.variant = config.variant
        self.dropout_p = config.dropout
        side = r_hat if r_hat is not None else MF.r_hat(in_features, out_features, config.r, config.variant)
        self.weight = nn.Parameter(torch.zeros(side, side, dtype=config.dtype, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def r_hat(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MF.mora_forward(self.dropout(x), self.weight, self.in_features, self.out_features, self.variant)

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result + branch(x)`; a variant with a fused path (rope, sharing) adds into `result` in place.

        Without a graph and with fewer rows than r̂ (a generated token), the plain branch is the faster one (measured
        at SmolLM2's shapes: rope 73-144 µs against 111-256 µs for 8 rows), so inference takes it there."""
        x = x.to(self.weight.dtype)
        fused_add = get_variant(self.variant).fused_add
        if fused_add is not None and (torch.is_grad_enabled() or x.numel() >= self.r_hat * x.shape[-1]):
            return fused_add(result, self.dropout(x), self.weight)
        return result + self(x).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return MF.mora_delta_weight(self.weight, self.in_features, self.out_features, self.variant)

    def stack_key(self) -> Optional[tuple]:
        """Adapters with equal keys can answer their rows in one batched product (`stacked_branch`); None: never."""
        if not MF.stacks(self.variant):
            return None
        return (self.kind, get_variant(self.variant).name, self.r_hat, self.in_features, self.out_features,
                self.weight.dtype)

    @staticmethod
    def stack(adapters: Sequence["MoRAAdapter"]) -> tuple[torch.Tensor, ...]:
        """The adapters' weights laid out for `stacked_branch` (a layer keeps them while its rows stay chosen)."""
        return (MF.stack_matrices([adapter.weight for adapter in adapters]),)

    @staticmethod
    def stacked_branch(adapters: Sequence["MoRAAdapter"], stacked: tuple[torch.Tensor, ...],
                       x: torch.Tensor) -> torch.Tensor:
        """`[A, N, k] -> [A, N, d]`, block a through adapters[a] (equal `stack_key`s, no dropout: inference)."""
        first, (weights,) = adapters[0], stacked
        return MF.mora_forward_stacked(x.to(weights.dtype), weights, first.in_features, first.out_features,
                                       first.variant)

    def reset(self) -> None:
        with torch.no_grad():
            self.weight.zero_()

    def lora_equivalent_parameters(self) -> int:
        return MF.lora_parameter_count(self.in_features, self.out_features, self.r)


class LoRAAdapter(nn.Module):
    """`B A dropout(x) · scaling`, initialised as peft does (A Kaiming-uniform with a = sqrt(5), B zero)."""

    kind = "lora"

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r = config.r
        self.alpha = config.alpha
        self.use_rslora = config.use_rslora
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=config.dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=config.dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not config.init_weights:
            nn.init.normal_(self.lora_B, std=0.02)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return result + self(x.to(self.lora_A.dtype)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def stack_key(self) -> Optional[tuple]:
        return (self.kind, self.r, self.in_features, self.out_features, self.lora_A.dtype)

    @staticmethod
    def stack(adapters: Sequence["LoRAAdapter"]) -> tuple[torch.Tensor, ...]:
        """`Aᵀ` and `(scaling·B)ᵀ` of each adapter, stacked contiguous (a batched product reads them fastest so)."""
        return (torch.stack([adapter.lora_A.T for adapter in adapters]),
                torch.stack([adapter.lora_B.T * adapter.scaling for adapter in adapters]))

    @staticmethod
    def stacked_branch(adapters: Sequence["LoRAAdapter"], stacked: tuple[torch.Tensor, ...],
                       x: torch.Tensor) -> torch.Tensor:
        first_factors, second_factors = stacked
        return torch.bmm(torch.bmm(x.to(first_factors.dtype), first_factors), second_factors)

    def reset(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def lora_equivalent_parameters(self) -> int:
        return MF.lora_parameter_count(self.in_features, self.out_features, self.r)


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and kin): `y = x @ W + b` with W stored `in × out`."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a linear layer, a transposed `Conv1D` or an AdaptedLinear around either. A
    linear layer says its own (a quantised one, such as bitsandbytes' Linear4bit, packs its weight in another shape)."""
    if isinstance(module, (nn.Linear, AdaptedLinear)):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: `in × out`


def build_adapter(in_features: int, out_features: int, config: AdapterConfig, device=None) -> nn.Module:
    if isinstance(config, MoRAConfig):
        return MoRAAdapter(in_features, out_features, config, device=device)
    if isinstance(config, LoRAConfig):
        return LoRAAdapter(in_features, out_features, config, device=device)
    raise TypeError(f"unknown adapter config {type(config).__name__}: use MoRAConfig or LoRAConfig")


def _rows_selector(indices: list[int], device: torch.device) -> Union[slice, torch.Tensor]:
    """An adapter's rows of a per-row batch: a slice when they are evenly spaced (one adapter's block of rows, or
    every k-th row when k adapters take turns, as batched chat, serving and evaluation lay them out), so its branch
    reads a view and adds into the output in place instead of copying rows out and the whole output back; an index
    tensor otherwise."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(indices, indices[1:])):
        return slice(indices[0], indices[-1] + 1, step)
    return torch.tensor(indices, device=device)


@dataclass(frozen=True)
class _RowStack:
    """Adapters whose rows of a per-row batch form a regular grid (row `first + a·between + j·within` is row j of
    adapter a) and whose branches stack: their rows are read and written as one `[A, n, ...]` strided view."""

    names: tuple[str, ...]
    first: int
    between: int
    within: int
    count: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The grid's rows of `tensor` (`[rows, ...]`) as `[A, n, ...]`, a view (writing into it writes the rows)."""
        row = tensor.stride(0)
        return tensor.as_strided((len(self.names), self.count, *tensor.shape[1:]),
                                 (self.between * row, self.within * row, *tensor.stride()[1:]),
                                 tensor.storage_offset() + self.first * row)


def _row_stack(groups: dict[str, Union[slice, torch.Tensor]], adapters: nn.ModuleDict) -> Optional[_RowStack]:
    """The grid of rows if every adapter in the batch has evenly spaced rows, as many as the others, laid out in
    blocks (`aaa bbb`) or taking turns (`ab ab ab`), and all of them stack (same kind, variant and shape)."""
    if len(groups) < 2 or not all(isinstance(rows, slice) for rows in groups.values()):
        return None
    names = list(groups)
    ranges = [range(rows.start, rows.stop, rows.step) for rows in groups.values()]
    count, within = len(ranges[0]), ranges[0].step
    between = ranges[1].start - ranges[0].start
    regular = all(len(r) == count and (r.step == within or count == 1) for r in ranges) and all(
        b.start - a.start == between for a, b in zip(ranges, ranges[1:]))
    keys = {adapters[name].stack_key() for name in names}
    if not regular or between <= 0 or len(keys) != 1 or None in keys:
        return None
    return _RowStack(tuple(names), ranges[0].start, between, within, count)


class AdaptedLinear(nn.Module):
    """A frozen base layer with named adapters; `forward` adds the active adapter's branch (or, per row, each row's).

    Per-row choice (`row_adapters`, one name or None per batch row) lets one forward pass serve several adapters
    side by side on one shared base, which is how the studio's chat answers with N adapters at once.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"can only adapt nn.Linear or Conv1D layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = is_transposed_linear(base_layer)
        self.in_features, self.out_features = layer_features(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.merged_adapters: list[str] = []
        self.row_adapters: Optional[list[Optional[str]]] = None
        self._row_groups: dict[str, Union[slice, torch.Tensor]] = {}
        self._row_stack: Optional[_RowStack] = None
        self._stack_cache: Optional[tuple[tuple, tuple[torch.Tensor, ...]]] = None
        self.train(base_layer.training)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `layer.weight` (dtype checks, tying) keeps working."""
        return self.base_layer.weight

    def add_adapter(self, name: str, config: AdapterConfig) -> nn.Module:
        return self.attach(name, build_adapter(self.in_features, self.out_features, config, self.weight.device))

    def attach(self, name: str, adapter: nn.Module) -> nn.Module:
        """Register a built adapter; it follows the layer's train/eval mode, as a submodule added later must."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter.train(self.training)
        return adapter

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_row_adapters(self, rows: Optional[Sequence[Optional[str]]]) -> None:
        """Choose an adapter (or None: base only) for each batch row of the following forward passes."""
        if rows is None:
            self.row_adapters, self._row_groups, self._row_stack, self._stack_cache = None, {}, None, None
            return
        unknown = [n for n in rows if n is not None and n not in self.adapters]
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} on this layer (has: {', '.join(self.adapters)})")
        self.row_adapters = list(rows)
        device = self.base_layer.weight.device
        self._row_groups = {
            name: _rows_selector([i for i, n in enumerate(rows) if n == name], device)
            for name in dict.fromkeys(n for n in rows if n is not None)
        }
        self._row_stack, self._stack_cache = _row_stack(self._row_groups, self.adapters), None

    def _branch(self, name: str, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        adapter = self.adapters[name]
        parameter = next(adapter.parameters())
        return adapter(x.to(parameter.dtype)).to(out_dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._forward_per_row(x, result)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return result
        return self.adapters[name].add_to(result, x)

    def _forward_per_row(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per-row adapters name {len(rows)} rows but the batch has {x.shape[0]}")
        if self.merged_adapters:
            raise RuntimeError(f"adapters {self.merged_adapters} are merged: unmerge before choosing adapters per row")
        stack = self._row_stack
        if stack is not None and not self.training and not torch.is_grad_enabled():
            # inference (no dropout, no graph): every adapter's rows in one batched branch, not one branch each
            adapters = [self.adapters[name] for name in stack.names]
            selected = stack.view(x).reshape(len(adapters), -1, x.shape[-1])
            branch = type(adapters[0]).stacked_branch(adapters, self._stacked_weights(adapters), selected)
            outputs = stack.view(result)
            outputs += branch.view(outputs.shape).to(result.dtype)
            return result
        for name, rows in self._row_groups.items():
            if isinstance(rows, slice):  # evenly spaced rows: a view in, an add into the output's own rows
                result[rows] += self._branch(name, x[rows], result.dtype)
            else:
                result = result.index_add(0, rows, self._branch(name, x.index_select(0, rows), result.dtype))
        return result

    def _stacked_weights(self, adapters: list[nn.Module]) -> tuple[torch.Tensor, ...]:
        """The stacked adapters' weights, built once for as long as the rows stay chosen and the weights unchanged
        (a generation reads them at every token)."""
        version = tuple((id(p), p._version) for adapter in adapters for p in adapter.parameters())
        if self._stack_cache is None or self._stack_cache[0] != version:
            self._stack_cache = (version, type(adapters[0]).stack(adapters))
        return self._stack_cache[1]

    def merge(self, names: Optional[Sequence[str]] = None) -> None:
        """`W0 ← W0 + ΔW` for each named adapter (default: the active one); after it the layer runs at base speed."""
        for name in self._names(names):
            if name not in self.merged_adapters:
                self._add_to_weight(self.adapters[name].delta_weight(), sign=1.0)
                self.merged_adapters.append(name)

    def unmerge(self, names: Optional[Sequence[str]] = None) -> None:
        """Subtract merged adapters again (default: all merged ones, newest first)."""
        targets = list(names) if names is not None else list(self.merged_adapters)
        for name in reversed(targets):
            if name in self.merged_adapters:
                self._add_to_weight(self.adapters[name].delta_weight(), sign=-1.0)
                self.merged_adapters.remove(name)

    def _names(self, names: Optional[Sequence[str]]) -> list[str]:
        if names is None:
            return [self.active_adapter] if self.active_adapter is not None else []
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise KeyError(f"no adapter named {missing[0]!r} on this layer")
        return list(names)

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"cannot merge into the quantised base layer {type(self.base_layer).__name__} "
                            f"({weight.dtype} weights): replace it by a dequantised nn.Linear first")
        delta = delta.detach().to(torch.float32)
        if self.transposed:
            delta = delta.T
        weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    @torch.no_grad()
    def fold_into_base(self, name: str) -> None:
        """Add an adapter's update to the base weight for good (not tracked as merged): ReMoRA's restart."""
        self._add_to_weight(self.adapters[name].delta_weight(), sign=1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, active={self.active_adapter!r}"
