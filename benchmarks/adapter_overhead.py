"""Forward+backward time of a frozen linear layer with MoRA against LoRA at the same parameter budget.

Side by side in one run, interleaved, on LLaMA-7B layer shapes: MoRA rope r=8 against LoRA r=8, MoRA sharing r=256
against LoRA r=256, and a merged MoRA layer against the bare base layer. On a GPU: the real shapes, 8192 tokens,
bfloat16. On a CPU: the shapes divided by --cpu-scale (default 4) and fewer tokens, float32. `--shapes smollm2`
times the default model's own layer shapes instead (unscaled).

Each figure is read against its floor: the ratio MoRA / LoRA that the multiply-add count predicts
(`benchmarks/arithmetic.py`); a ratio above it is overhead, one below it is LoRA's own overhead showing.

    python benchmarks/adapter_overhead.py [--device cuda] [--repeats 30] [--shapes smollm2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks.arithmetic
from benchmarks.arithmetic import layer_multiply_adds, load, machine as describe_machine
from mora import LoRAConfig, MoRAConfig
from mora.layers import AdaptedLinear

LLAMA_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down
PAIRS = [("rope", 8), ("sharing", 256)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    layer(x).backward(grad)


def _layers(k: int, d: int, variant: str, r: int, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(k, d, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    layers = {"base": base}
    for label, config in ((f"lora r={r}", LoRAConfig(r=r)), (f"mora {variant} r={r}", MoRAConfig(r=r, variant=variant))):
        layer = AdaptedLinear(base)
        layer.add_adapter("a", config)
        layer.active_adapter = "a"
        with torch.no_grad():
            for p in layer.adapters["a"].parameters():
                p.normal_(0, 0.01)
        layers[label] = layer
    merged = AdaptedLinear(nn.Linear(k, d, bias=False).to(device=device, dtype=dtype).requires_grad_(False))
    merged.add_adapter("a", MoRAConfig(r=r, variant=variant))
    merged.active_adapter = "a"
    merged.merge()
    layers[f"mora {variant} r={r} merged"] = merged
    return layers


def measure(k: int, d: int, variant: str, r: int, tokens: int, repeats: int, dtype: torch.dtype,
            device: torch.device) -> dict[str, float]:
    layers = _layers(k, d, variant, r, dtype, device)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)
    times: dict[str, list[float]] = {label: [] for label in layers}
    for _ in range(3):
        for layer in layers.values():
            _step(layer, x, grad)
    for _ in range(repeats):  # interleaved, so drift in machine load hits every layer alike
        for label, layer in layers.items():
            _synchronize(device)
            start = time.perf_counter()
            _step(layer, x, grad)
            _synchronize(device)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) * 1000 for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--cpu-scale", type=int, default=4, help="divide the layer shapes by this on a CPU")
    parser.add_argument("--shapes", choices=("llama7b", "smollm2"), default="llama7b",
                        help="LLaMA-7B's layer shapes (scaled on a CPU) or the default model's (SmolLM2-135M)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokens = args.tokens or (8192 if on_gpu else 512)
    repeats = args.repeats or (50 if on_gpu else 15)
    scale = 1 if on_gpu or args.shapes == "smollm2" else args.cpu_scale
    machine = describe_machine(device)
    print(f"# adapter overhead: {machine}, {dtype}, {tokens} tokens, median of {repeats}, forward+backward (ms); "
          f"{load()} at the start")
    print(f"| shape (k→d) | pair | base | LoRA | MoRA | MoRA/LoRA | floor | merged MoRA/base |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k, d in LLAMA_7B_SHAPES if args.shapes == "llama7b" else SMOLLM2_SHAPES:
        k, d = k // scale, d // scale
        for variant, r in PAIRS:
            t = measure(k, d, variant, r, tokens, repeats, dtype, device)
            lora, mora_ = t[f"lora r={r}"], t[f"mora {variant} r={r}"]
            merged, base = t[f"mora {variant} r={r} merged"], t["base"]
            floor = layer_multiply_adds(k, d, "mora", r, variant) / layer_multiply_adds(k, d, "lora", r)
            print(f"| {k}→{d} | {variant} r={r} vs LoRA r={r} | {base:.2f} | {lora:.2f} | {mora_:.2f} "
                  f"| {mora_ / lora:.3f} | {floor:.3f} | {merged / base:.3f} |", flush=True)
            rows.append({"in_features": k, "out_features": d, "variant": variant, "r": r, "base_ms": base,
                         "lora_ms": lora, "mora_ms": mora_, "merged_mora_ms": merged, "mora_over_lora": mora_ / lora,
                         "floor": floor, "merged_over_base": merged / base})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"benchmark": "adapter_overhead", "machine": machine, "dtype": str(dtype), "tokens": tokens,
                       "repeats": repeats, "shape_scale": scale, "unit": "ms per forward+backward, median",
                       "load_after": load(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
