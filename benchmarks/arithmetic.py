"""What the speed benchmarks read their figures against: the machine they ran on, its load, and the multiply-add
count of a training step, from which the ratio MoRA / LoRA is predicted (the "floor": the ratio if every
multiply-add cost the same and nothing else cost anything).

Per token, a frozen linear layer `k → d` costs `k·d` multiply-adds forward and `k·d` backward (the input's gradient
only; its weight is frozen). An adapter adds its branch forward, its input's gradient and its weights' gradient:

- LoRA r: `r(k + d)` each way, so `3r(k + d)`;
- MoRA sharing: one `r̂ × r̂` product, of which only `min(d, r̂)` rows reach the output and, when `k < r̂`, only
  `k` distinct inputs enter it (`mora.fused` computes no more), so `3·min(d, r̂)·min(k, r̂)`; the other grouped
  variants (types 2-4, no fused path) `3r̂²`;
- MoRA rope / decouple: one `r̂ × r̂` product per chunk whose outputs survive, only the surviving rows of the chunk
  that `d` cuts, so `3·min(d, n_used·r̂)·r̂` (a tiled output is computed once);
- truncation: `3·min(k, r̂)·min(d, r̂)`.

Compressing, tiling, rotating and adding cost no multiply-adds here: they are what a measured ratio above the
floor is made of.
"""
from __future__ import annotations

import os
import platform

import torch

from mora.fused import used_chunks
from mora.variants import default_variant, get_variant, r_hat


def machine(device: torch.device | str = "cpu") -> str:
    """`"AMD EPYC, 2 cores, torch 2.13.0, 2 threads"`, or the GPU's name and torch's version."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            "no GPU")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def load() -> str:
    """The 1, 5 and 15 minute load averages: on a shared machine, how much else was running."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def adapter_multiply_adds(in_features: int, out_features: int, adapter: str, r: int, variant: str | None = None) -> int:
    """Multiply-adds per token of one adapter's branch, forward and backward (see the module's docstring)."""
    k, d = in_features, out_features
    if adapter == "lora":
        return 3 * r * (k + d)
    name = get_variant(variant or default_variant(r)).name
    side = r_hat(k, d, r, name)
    if name in ("rope", "decouple"):
        _, used = used_chunks(k, d, side)
        return 3 * min(d, used * side) * side
    if name in ("truncation", "sharing"):
        return 3 * min(k, side) * min(d, side)
    return 3 * side * side


def layer_multiply_adds(in_features: int, out_features: int, adapter: str | None, r: int = 0,
                        variant: str | None = None) -> int:
    """Multiply-adds per token of a frozen layer's forward and backward, with the adapter's branch (None: bare)."""
    base = 2 * in_features * out_features
    return base if adapter is None else base + adapter_multiply_adds(in_features, out_features, adapter, r, variant)


def step_multiply_adds(shapes, adapter: str, r: int, variant: str | None, sequence: int) -> int:
    """Multiply-adds per token of one training step of a model (`workers.model_shapes.ModelShapes`) whose block
    linears all carry the adapter: those linears with their branches, the frozen LM head (forward and its input's
    gradient) and attention's two products (forward and backward, three times the forward; causal, so a token meets
    half the sequence on average). Norms, activations, the loss and the optimizer are left out, as is anything that
    is not a multiply-add."""
    linears = sum(layer_multiply_adds(k, d, adapter, r, variant) for _, k, d in shapes.linear_layers())
    head = 2 * shapes.hidden_size * shapes.vocab_size
    attention = shapes.num_layers * 3 * 2 * (sequence // 2) * shapes.num_heads * shapes.head_dim
    return linears + head + attention
