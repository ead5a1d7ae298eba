"""How the Runs tab's one-second tick grows with the history: time per tick and bytes it sends, side by side for
several store sizes, on SQLite (and PostgreSQL when one is reachable).

For each size (runs stored, points per selected run; 10 runs selected) it seeds a fresh store, then measures
`app.runs_dashboard.tick` as the Runs tab calls it:

- open: the first tick of a new page, nothing selected yet (the table is sent);
- select: the tick after ticking the 10 runs (their sampled curves are read and drawn);
- quiet: a tick with nothing new (median of 20);
- live: a tick after each of the 10 selected runs logged 10 more steps (median of 10).

Bytes are the JSON of what the tick hands Gradio (table rows, choices, the Plotly figure), which is what goes over the
wire; UNCHANGED parts send nothing. Usage: `python benchmarks/dashboard_scale.py [--sizes 10:1000 100:10000 ...]
[--postgres URL]`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import runs_dashboard as dash  # noqa: E402
from app.service import StudioService  # noqa: E402
from storage.repo import Store  # noqa: E402

SELECTED = 10
DEFAULT_SIZES = ("10:1000", "100:10000", "1000:100000")
BATCH = 20_000


def _sent_bytes(result: dash.Tick) -> int:
    total = 0
    for part in (result.table, result.choices, result.page_note, result.figure, result.diff, result.metrics,
                 result.ranks):
        if part is dash.UNCHANGED:
            continue
        if hasattr(part, "to_json"):
            total += len(part.to_json())
        else:
            total += len(json.dumps(part, default=str))
    return total


def _points(steps: range) -> list[dict]:
    return [{"name": "loss", "step": s, "value": 2.0 / (1 + s / 100) + (0.5 if s % 997 == 0 else 0.0),
             "epoch": s / 1000, "tokens": 512 * s, "time": 1.7e9 + s} for s in steps]


def seed(store: Store, runs: int, points: int) -> list[str]:
    made = [store.create_run({"r": 8, "seed": i, "learning_rate": 3e-4}, name=f"run {i:04d}", model="tiny",
                             adapter=("mora", "lora")[i % 2], r=8).id for i in range(runs)]
    selected = made[-SELECTED:]
    for run_id in selected:
        store.set_status(run_id, "running")
        for start in range(0, points, BATCH):
            store.add_metric_points(run_id, _points(range(start, min(points, start + BATCH))))
        store.update_progress(run_id, step=points - 1, max_steps=points * 2)
    return selected


def measure(store: Store, runs: int, points: int) -> dict:
    selected = seed(store, runs, points)
    service = StudioService(store, runs_dir=Path(tempfile.mkdtemp()))
    query, view = dash.RunsQuery(), dash.CurveView(run_ids=tuple(selected))
    started = time.perf_counter()
    opened = dash.tick(service, None, query, dash.CurveView())
    open_s, open_bytes = time.perf_counter() - started, _sent_bytes(opened)
    started = time.perf_counter()
    chosen = dash.tick(service, opened.state, query, view)
    select_s, select_bytes = time.perf_counter() - started, _sent_bytes(chosen)
    state, quiet = chosen.state, []
    for _ in range(20):
        started = time.perf_counter()
        result = dash.tick(service, state, query, view, now=None)
        quiet.append((time.perf_counter() - started, _sent_bytes(result)))
        state = result.state
    live, step = [], points
    for _ in range(10):
        for run_id in selected:
            store.add_metric_points(run_id, _points(range(step, step + 10)))
            store.update_progress(run_id, step=step + 9)
        step += 10
        started = time.perf_counter()
        result = dash.tick(service, state, query, view)
        live.append((time.perf_counter() - started, _sent_bytes(result)))
        state = result.state
    return {"runs": runs, "points": points, "open_ms": 1000 * open_s, "open_kb": open_bytes / 1000,
            "select_ms": 1000 * select_s, "select_kb": select_bytes / 1000,
            "quiet_ms": 1000 * statistics.median(t for t, _ in quiet),
            "quiet_kb": statistics.median(b for _, b in quiet) / 1000,
            "live_ms": 1000 * statistics.median(t for t, _ in live),
            "live_kb": statistics.median(b for _, b in live) / 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="RUNS:POINTS per selected run")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL to measure too (an empty database)")
    args = parser.parse_args()
    backends = [("sqlite", None)] + ([("postgresql", args.postgres)] if args.postgres else [])
    print("| store | runs | points per selected run | open the tab: ms / KB | select 10 runs: ms / KB | "
          "quiet tick: ms / KB | live tick (10 runs): ms / KB |")
    print("|---|---|---|---|---|---|---|")
    for backend, url in backends:
        for size in args.sizes:
            runs, points = (int(part) for part in size.split(":"))
            with tempfile.TemporaryDirectory() as folder:
                with Store(url or f"sqlite:///{folder}/studio.db") as store:
                    if url:
                        for run in store.list_runs():
                            store.delete_run(run.id)
                    row = measure(store, runs, points)
            print(f"| {backend} | {row['runs']:,} | {row['points']:,} | {row['open_ms']:.0f} / {row['open_kb']:.0f} | "
                  f"{row['select_ms']:.0f} / {row['select_kb']:.0f} | {row['quiet_ms']:.1f} / {row['quiet_kb']:.2f} | {row['live_ms']:.0f} / {row['live_kb']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
