"""What an adapter is, before it is attached: the user's choices for MoRA and for LoRA.

The configs carry only what a person chooses. What follows from the model (each layer's `r̂`, its shapes) is
computed where the layer is, so a config can be reused across models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from mora.variants import VariantName as Variant, default_variant, normalize_variant

TargetModules = Optional[Union[str, Sequence[str]]]


@dataclass
class AdapterConfig:
    """Options shared by every adapter kind."""

    r: int = 8
    """LoRA-equivalent rank: the parameter budget is `(in + out)·r` per layer, for MoRA as for LoRA."""
    target_modules: TargetModules = None
    """Module names (matched against the last part of each path, or a whole dotted suffix), or one regex string
    matched against full paths. None: every linear layer inside the model's repeated blocks, not the LM head."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    dtype: torch.dtype = torch.float32
    """Adapter weights stay in float32 by default while the base runs in its own dtype, as peft does."""

    kind = "base"

    def __post_init__(self) -> None:
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class MoRAConfig(AdapterConfig):
    """MoRA: one square trainable matrix per layer (no alpha: MoRA has no scaling factor)."""

    variant: Optional[Variant] = None
    """"rope" or "sharing" (or "truncation", "decouple", reference types 1-4, 6). None: rope for r ≤ 32,
    sharing above, as the paper recommends."""

    kind = "mora"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.variant = normalize_variant(self.variant if self.variant is not None else default_variant(self.r))


@dataclass
class LoRAConfig(AdapterConfig):
    """Standard LoRA: `ΔW = B A · alpha / r` (or `alpha / sqrt(r)` with rsLoRA), A Kaiming-uniform, B zero."""

    alpha: float = 16.0
    use_rslora: bool = False
    init_weights: bool = True
    """False starts B random too (useful for tests; a fresh adapter then changes the model)."""

    kind = "lora"

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


@dataclass
class AdapterInfo:
    """What one attached adapter is, gathered from its layers (the layers are the single source of truth)."""

    name: str
    kind: str
    r: int
    layers: list[str] = field(default_factory=list)
    variant: Optional[str] = None
    alpha: Optional[float] = None
    use_rslora: bool = False
    dropout: float = 0.0
    trainable_parameters: int = 0
    lora_equivalent_parameters: int = 0
    r_hat: dict[str, int] = field(default_factory=dict)
