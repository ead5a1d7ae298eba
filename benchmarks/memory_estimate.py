"""The pre-flight memory estimate against what real training steps hold: each configuration trains one step of the
default model (SmolLM2-135M) on the CPU in its own process, and its peak resident memory is set beside the
estimate (workers.memory_estimate). Prints a table; the README's "Memory before launch" comes from it.

    python benchmarks/memory_estimate.py [--steps 1] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [
    dict(adapter="mora", r=8, batch_size=4, max_length=128),
    dict(adapter="lora", r=8, batch_size=4, max_length=128),
    dict(adapter="mora", r=8, batch_size=8, max_length=512),
    dict(adapter="mora", r=8, batch_size=8, max_length=512, gradient_checkpointing=True),
    dict(adapter="lora", r=256, batch_size=4, max_length=256),
    dict(adapter="mora", r=256, variant="sharing", batch_size=4, max_length=256),
    dict(adapter="full", batch_size=2, max_length=128),
]


def _write_text(folder: Path) -> Path:
    rng = random.Random(0)
    words = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{rng.choice('nrst')}" for _ in range(500)]
    path = folder / "text.jsonl"
    with open(path, "w") as out:
        for _ in range(200):
            out.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
    return path


def measure_one(config: dict) -> float:
    """Train as `config` says in this process; return its peak resident MiB (the run's own step events)."""
    from workers.events import read_events
    from workers.train_config import TrainConfig
    from workers.training import run_training

    with tempfile.TemporaryDirectory() as run_dir:
        result = run_training(TrainConfig.from_dict(config), Path(run_dir))
        if result.status != "succeeded":
            raise SystemExit(f"the run failed: {result.message}")
        steps = [e for e in read_events(Path(run_dir) / "metrics.jsonl") if e["kind"] == "step"]
        return max(e["peak_memory_mb"] for e in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", help="comma-separated indices of the configurations to run (default: all)")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        print(json.dumps({"peak_mb": measure_one(json.loads(args.measure_one))}))
        return
    from workers.memory_estimate import GIB, estimate
    from workers.model_shapes import shapes_for
    from workers.train_config import TrainConfig

    shapes = shapes_for(None)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = _write_text(Path(folder))
        chosen = [CONFIGS[int(i)] for i in args.only.split(",")] if args.only else CONFIGS
        for settings in chosen:
            config = dict(settings, data=str(data), max_steps=args.steps, logging_steps=1, pack_text=True,
                          learning_rate=1e-4)
            out = subprocess.run([sys.executable, __file__, "--measure-one", json.dumps(config)], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
            if out.returncode:
                raise SystemExit(f"{settings}: {out.stderr.strip().splitlines()[-1]}")
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] * 2**20
            est = estimate(shapes, TrainConfig.from_dict(config).resolved(), "cpu").total
            label = " ".join(f"{k}={v}" for k, v in settings.items())
            rows.append({"config": label, "measured_gib": peak / GIB, "estimated_gib": est / GIB,
                         "ratio": est / peak})
            print(f"{label:70s} measured {peak / GIB:5.2f} GiB  estimated {est / GIB:5.2f} GiB  "
                  f"estimate/measured {est / peak:4.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
