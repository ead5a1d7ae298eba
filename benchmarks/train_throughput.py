"""Training throughput (tokens/s) of MoRA against LoRA on the default model, side by side in one run.

Pairs: MoRA rope r=8 vs LoRA r=8, MoRA sharing r=256 vs LoRA r=256. Same data (packed text, so every example is
exactly --max-length tokens and no padding skews the count), same seed, same batch; each method runs --rounds times,
interleaved (A B C D A B C D ...), and each round's figure is the median tokens/s over its steps after warm-up, as
the training engine itself reports them. A method's figure is the median of its rounds; the ratio MoRA / LoRA is the
ratio of those medians, printed with the lowest and highest of the rounds' own ratios (a lucky or unlucky round
shows there), with the machine, its load average before and after, and the floor: the ratio the step's
multiply-add count predicts (`benchmarks/arithmetic.py`; only for models whose shapes the studio reads). On a
shared machine the load moves the figures: compare runs made at a low load only.

    python benchmarks/train_throughput.py [--steps 6] [--rounds 3] [--batch-size 4] [--max-length 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks.arithmetic
from benchmarks.arithmetic import load, machine, step_multiply_adds
from workers.events import read_events
from workers.model_shapes import shapes_for
from workers.train_config import TrainConfig
from workers.training import run_training

METHODS = [("lora", 8, None), ("mora", 8, "rope"), ("lora", 256, None), ("mora", 256, "sharing")]
WORDS = ("model adapter rank matrix memory update token layer square budget learning compress rotate chunk "
         "gradient optimizer train evaluate sequence attention projection").split()


def write_corpus(folder: Path, documents: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(documents)) + "\n")
    return path


def label(adapter: str, r: int, variant: str | None) -> str:
    return f"{adapter} {variant + ' ' if variant else ''}r={r}"


def measure(model: str | None, data: Path, workdir: Path, adapter: str, r: int, variant: str | None,
            args: argparse.Namespace, round_index: int) -> list[float]:
    config = TrainConfig(data=str(data), model=model, adapter=adapter, r=r, variant=variant, max_steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, seed=0, lr_scheduler="constant",
                         warmup_ratio=0.0)
    run_dir = workdir / f"{adapter}-{variant}-{r}-{round_index}"
    result = run_training(config, run_dir)
    if result.status != "succeeded":
        raise SystemExit(f"{label(adapter, r, variant)} failed: {result.message}")
    steps = [e for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "step"]
    return [e["tokens_per_second"] for e in steps[args.warmup:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the figure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = machine("cuda" if torch.cuda.is_available() else "cpu")
    load_before = load()
    samples: dict[str, list[float]] = {label(*m): [] for m in METHODS}
    rounds: dict[str, list[float]] = {label(*m): [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = write_corpus(workdir)
        for round_index in range(args.rounds):
            for method in METHODS:
                values = measure(args.model, data, workdir, *method, args, round_index)
                samples[label(*method)] += values
                rounds[label(*method)].append(statistics.median(values))
    median = {name: statistics.median(values) for name, values in rounds.items()}
    shapes = shapes_for(args.model)
    print(f"# training throughput: {args.model or 'default model'}, {device}, batch {args.batch_size}x"
          f"{args.max_length}, median of {args.rounds} interleaved rounds x {args.steps - args.warmup} measured "
          f"steps, tokens/s; {load_before} before, {load()} after")
    print("| pair | LoRA tok/s | MoRA tok/s | MoRA / LoRA | rounds' MoRA / LoRA | floor |")
    print("|---|---|---|---|---|---|")
    rows = []
    for lora, mora_ in ((METHODS[0], METHODS[1]), (METHODS[2], METHODS[3])):
        a, b = median[label(*lora)], median[label(*mora_)]
        ratios = [m / l for l, m in zip(rounds[label(*lora)], rounds[label(*mora_)])]
        floor = None if shapes is None else (step_multiply_adds(shapes, *lora, args.max_length)
                                             / step_multiply_adds(shapes, *mora_, args.max_length))
        print(f"| {label(*mora_)} vs {label(*lora)} | {a:,.0f} | {b:,.0f} | {b / a:.3f} "
              f"| {min(ratios):.3f}–{max(ratios):.3f} | {'n/a' if floor is None else f'{floor:.3f}'} |")
        rows.append({"mora": label(*mora_), "lora": label(*lora), "lora_tokens_per_s": a, "mora_tokens_per_s": b,
                     "mora_over_lora": b / a, "round_ratios": ratios, "floor": floor})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"benchmark": "train_throughput", "model": args.model or "default model", "device": device,
                       "batch_size": args.batch_size, "max_length": args.max_length, "rounds": args.rounds,
                       "measured_steps": args.steps - args.warmup, "unit": "tokens/s, median of the rounds",
                       "load_before": load_before, "load_after": load(), "rows": rows, "rounds_tokens_per_s": rounds,
                       "samples": samples}, handle, indent=2)


if __name__ == "__main__":
    main()
