"""What an adapter learned, in the terms of the paper's Fig. 5: the singular values of each layer's ΔW and an
effective rank, so MoRA's high-rank updates can be seen beside LoRA's rank-r ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mora.inject import active_adapter, adapted_layers

DEFAULT_THRESHOLD = 0.01


@dataclass
class LayerSpectrum:
    path: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    effective_rank: int


def effective_rank(singular_values: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> int:
    """How many singular values exceed `threshold` × the largest (0 for an all-zero update)."""
    if singular_values.numel() == 0 or float(singular_values.max()) == 0.0:
        return 0
    return int((singular_values > threshold * singular_values.max()).sum())


@torch.no_grad()
def delta_spectrum(
    model: nn.Module, name: Optional[str] = None, threshold: float = DEFAULT_THRESHOLD
) -> list[LayerSpectrum]:
    """Singular values (float32, descending) and effective rank of every layer's ΔW for one adapter."""
    name = name or active_adapter(model)
    spectra = []
    for path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        delta = layer.adapters[name].delta_weight().float()
        values = torch.linalg.svdvals(delta).cpu()
        spectra.append(LayerSpectrum(path, tuple(delta.shape), values, effective_rank(values, threshold)))
    if not spectra:
        raise ValueError(f"the model has no adapter named {name!r}")
    return spectra


def effective_rank_summary(spectra: list[LayerSpectrum]) -> dict[str, float]:
    """Mean, min and max effective rank across layers: one line a user can compare between runs."""
    ranks = [s.effective_rank for s in spectra]
    return {"mean": sum(ranks) / len(ranks), "min": float(min(ranks)), "max": float(max(ranks)), "layers": len(ranks)}
