"""Latency of the live path, with real parts: from a training step's end on the worker to its point committed in
SQLite (p50, p95), and from submit to the job starting on an idle worker (p50, p95).

It starts an embedded Redis, one real Celery worker process and the collector (as the web process runs it), and
trains the tiny test model, so the figures measure the queue and the event path, not the model.

    python benchmarks/event_latency.py [--runs 10] [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.service import StudioService  # noqa: E402
from tests.fixtures.tiny_model import build_tiny_model  # noqa: E402
from tests.workers.queue_harness import make_world, wait_for  # noqa: E402
from tests.workers.sample_data import write_dataset  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(root / "models" / "tiny-llama")
        data = write_dataset(root, "chat")
        world = make_world(root, model_dir)
        try:
            committed: dict[tuple[str, int], float] = {}
            original = world.store.add_metric_points

            def timed_add(run_id, points):
                points = list(points)
                inserted = original(run_id, points)
                now = time.time()
                for point in points:
                    if point["name"] == "loss":
                        committed.setdefault((run_id, point["step"]), now)
                return inserted

            world.store.add_metric_points = timed_add
            world.start_worker()
            world.start_collector()
            service = StudioService(world.store, runs_dir=root / "runs")
            config = dict(data=str(data), model="tiny-llama", adapter="mora", r=8, max_steps=args.steps, batch_size=4,
                          max_length=64, learning_rate=1e-2)
            pickups, event_latencies = [], []
            for index in range(args.runs):
                sent = time.time()
                run = service.submit(config, name=f"latency {index}")
                wait_for(lambda: world.store.get_run(run.id).status in ("succeeded", "failed"), 120, "the run")
                from workers.events import read_events

                events = read_events(Path(run.run_dir) / "metrics.jsonl")
                started = next(e["time"] for e in events if e["kind"] == "status" and e["status"] == "running")
                pickups.append((started - sent) * 1000)
                for event in events:
                    if event["kind"] == "step":
                        event_latencies.append((committed[(run.id, event["step"])] - event["time"]) * 1000)
        finally:
            world.close()
    print("pickups ms:", [round(p) for p in pickups])
    print(f"# event latency: {args.runs} runs x {args.steps} steps, embedded Redis, 1 Celery worker, SQLite (WAL)")
    print("| path | p50 ms | p95 ms | samples |")
    print("|---|---|---|---|")
    print(f"| worker step end -> point committed in SQLite | {statistics.median(event_latencies):.1f} | "
          f"{percentile(event_latencies, 0.95):.1f} | {len(event_latencies)} |")
    print(f"| submit -> job started on an idle worker | {statistics.median(pickups):.1f} | "
          f"{percentile(pickups, 0.95):.1f} | {len(pickups)} |")


if __name__ == "__main__":
    main()
