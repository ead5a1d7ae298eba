"""ReMoRA (MORA_SPEC.md §4): every N optimizer steps, fold each MoRA update into its base weight, restart M at
zero, and switch the grouping, so the sum of the successive updates can reach a higher rank than one M allows."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from mora.inject import active_adapter, adapted_layers
from mora.variants import get_variant


def _successors(start: str) -> tuple[str, ...]:
    """The groupings met following each variant's ReMoRA successor (`mora.variants`) from `start` until it repeats."""
    order = [start]
    while (upcoming := get_variant(order[-1]).remora_next) not in (None, start) and upcoming not in order:
        order.append(upcoming)
    return tuple(order)


# The reference cycles types 1→2→3→4→1 (the registry's successors); the paper alternates 1↔2. Both keep r̂ (no
# rounding to even).
CYCLES: dict[str, tuple[str, ...]] = {
    "reference": _successors("sharing"),
    "paper": ("sharing", "type2"),
}


def next_variant(variant: str, cycle: str = "reference") -> str:
    order = CYCLES[cycle]
    if variant not in order:
        raise ValueError(
            f"ReMoRA switches between groupings {', '.join(order)}; the {variant!r} variant has none to switch to "
            "(use variant='sharing' with ReMoRA)")
    return order[(order.index(variant) + 1) % len(order)]


@torch.no_grad()
def remora_step(model: nn.Module, name: Optional[str] = None, cycle: str = "reference") -> list[nn.Parameter]:
    """Merge the MoRA adapter `name` (default: active) into the base weights for good, zero its M, move each layer
    to the next grouping, and return the reset parameters so the caller can clear their optimizer state.

    After a ReMoRA step the learned update lives in the base weights: save the merged model, not just the adapter.
    """
    name = name or active_adapter(model)
    reset: list[nn.Parameter] = []
    for layer in adapted_layers(model).values():
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None:
            continue
        if adapter.kind != "mora":
            raise ValueError(f"ReMoRA applies to MoRA adapters; {name!r} is {adapter.kind}")
        upcoming = next_variant(adapter.variant, cycle)
        layer.fold_into_base(name)
        adapter.reset()
        adapter.variant = upcoming
        reset.append(adapter.weight)
    if not reset:
        raise ValueError(f"the model has no adapter named {name!r}")
    return reset


def reset_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter]) -> None:
    """Forget the moments of restarted parameters: stale Adam statistics would push the fresh M off zero."""
    for parameter in parameters:
        optimizer.state.pop(parameter, None)
