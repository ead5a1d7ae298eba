"""Where a training step's time goes, by op: MoRA against LoRA on the default model, under torch.profiler.

One training step is forward, backward and AdamW on a batch of random token ids (labels = inputs), in float32 on the
CPU, as the training engine runs it (without the Trainer around it). The methods are stepped interleaved (A B A B
...) after warm-up steps, so drifting machine load hits each alike.

- By default each method's steps run under torch.profiler and the table lists each op's calls and self CPU time per
  step for every method and each one's difference from the first, largest difference first.
- `--time` runs no profiler: it times each step by the wall clock and by the process's CPU time and prints the
  median, lowest and highest of each, and the ratio of the medians against the first method. With one thread
  (`--threads 1`) the CPU time is the work the step does, little moved by other processes on a shared machine;
  the wall clock is what a user waits.
- `--plain` runs MoRA through `mora.functional`'s plain autograd graph instead of the fused paths in `mora.fused`
  (to see what those save); a method written `plain:VARIANT:R` does so for that method alone.

    python benchmarks/profile_step.py [--methods lora:8 mora:rope:8 plain:rope:8] [--steps 3] [--time]
        [--threads N] [--batch-size 4] [--max-length 128]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks.arithmetic
import mora
from benchmarks.arithmetic import load, machine
from mora import functional, variants  # functional attaches the built-in variants' fused paths on import
from workers.model_loading import load_model


def build(model_name: str | None, config: mora.AdapterConfig):
    model, _ = load_model(model_name, dtype="float32")
    model.requires_grad_(False)
    mora.add_adapter(model, "a", config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step(model, optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def parse_method(text: str) -> tuple[str, mora.AdapterConfig, bool]:
    """`lora:R`, `mora:VARIANT:R` or `plain:VARIANT:R` -> (label, config, whether to skip the fused path)."""
    kind, _, rest = text.partition(":")
    if kind == "lora":
        return f"lora r={rest}", mora.LoRAConfig(r=int(rest)), False
    if kind not in ("mora", "plain"):
        raise SystemExit(f"--methods: {text!r} is not lora:R, mora:VARIANT:R or plain:VARIANT:R")
    variant, _, r = rest.partition(":")
    name = f"mora {variant} r={r}" + (" (plain graph)" if kind == "plain" else "")
    return name, mora.MoRAConfig(r=int(r), variant=variant), kind == "plain"


class FusedPaths:
    """Turns the registry's fused paths off (for a plain-graph method) and back on."""

    def __init__(self) -> None:
        self.fused = {name: variants.get_variant(name).fused_add for name in variants.variant_names()}

    def use(self, on: bool) -> None:
        for name, fused_add in self.fused.items():
            variants.attach(name, fused_add=fused_add if on else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--methods", nargs="+", default=["lora:8", "mora:rope:8"],
                        help="lora:R, mora:VARIANT:R or plain:VARIANT:R; the first is the baseline")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--plain", action="store_true", help="every MoRA method through the plain autograd graph")
    parser.add_argument("--time", action="store_true", help="time the steps instead of profiling them")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = FusedPaths()
    methods = [parse_method(m) for m in args.methods]
    built = {label: (*build(args.model, config), plain or args.plain) for label, config, plain in methods}
    batch = torch.randint(0, 49152, (args.batch_size, args.max_length))
    load_before = load()
    for _ in range(args.warmup):
        for model, optimizer, plain in built.values():
            paths.use(not plain)
            step(model, optimizer, batch)
    wall: dict[str, list[float]] = {label: [] for label in built}
    cpu: dict[str, list[float]] = {label: [] for label in built}
    self_us: dict[str, collections.Counter] = {label: collections.Counter() for label in built}
    calls: dict[str, collections.Counter] = {label: collections.Counter() for label in built}
    for _ in range(args.steps):
        for label, (model, optimizer, plain) in built.items():
            paths.use(not plain)
            prof = profile(activities=[ProfilerActivity.CPU]) if not args.time else None
            if prof is not None:
                prof.__enter__()
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model, optimizer, batch)
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
            if prof is not None:
                prof.__exit__(None, None, None)
                for event in prof.key_averages():
                    self_us[label][event.key] += event.self_cpu_time_total / args.steps
                    calls[label][event.key] += event.count / args.steps
    paths.use(True)
    print(f"# one training step of {args.model or 'the default model'}, {args.batch_size}x{args.max_length} tokens, "
          f"float32, {machine()}; {load_before} before, {load()} after")
    if args.time:
        _print_times(wall, cpu, args.steps)
    else:
        _print_profile(self_us, calls, wall, args.top)


def _print_times(wall: dict[str, list[float]], cpu: dict[str, list[float]], steps: int) -> None:
    baseline = next(iter(wall))
    print(f"| method | wall s (median, lowest–highest of {steps}) | wall ratio | CPU s (median, lowest–highest) "
          f"| CPU ratio |")
    print("|---|---|---|---|---|")
    for label in wall:
        w, c = wall[label], cpu[label]
        print(f"| {label} | {statistics.median(w):.2f} ({min(w):.2f}–{max(w):.2f}) "
              f"| {statistics.median(wall[baseline]) / statistics.median(w):.3f} "
              f"| {statistics.median(c):.2f} ({min(c):.2f}–{max(c):.2f}) "
              f"| {statistics.median(cpu[baseline]) / statistics.median(c):.3f} |")


def _print_profile(self_us: dict[str, collections.Counter], calls: dict[str, collections.Counter],
                   wall: dict[str, list[float]], top: int) -> None:
    labels = list(self_us)
    base, others = labels[0], labels[1:]
    for label in labels:
        print(f"# {label}: step {statistics.median(wall[label]) * 1000:.0f} ms under the profiler (median), "
              f"profiled self time {sum(self_us[label].values()) / 1000:.0f} ms")
    print("| op | " + " | ".join(f"calls {label}" for label in labels) + " | "
          + " | ".join(f"{label} ms" for label in labels) + " | "
          + " | ".join(f"{label} − {base} ms" for label in others) + " |")
    print("|---" * (2 * len(labels) + len(others) + 1) + "|")
    keys = set().union(*(set(self_us[label]) for label in labels))
    rows = sorted(keys, key=lambda k: -max(abs(self_us[o][k] - self_us[base][k]) for o in others))
    for key in rows[:top]:
        print(f"| {key} | " + " | ".join(f"{calls[label][key]:.0f}" for label in labels) + " | "
              + " | ".join(f"{self_us[label][key] / 1000:.1f}" for label in labels) + " | "
              + " | ".join(f"{(self_us[o][key] - self_us[base][key]) / 1000:+.1f}" for o in others) + " |")
    totals = {label: sum(self_us[label].values()) / 1000 for label in labels}
    print("| all ops | " + " | ".join(f"{sum(calls[label].values()):.0f}" for label in labels) + " | "
          + " | ".join(f"{totals[label]:.0f}" for label in labels) + " | "
          + " | ".join(f"{totals[o] - totals[base]:+.0f}" for o in others) + " |")


if __name__ == "__main__":
    main()
