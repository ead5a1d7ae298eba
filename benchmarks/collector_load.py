"""The collector under load: N simulated workers each logging S steps a second to their run's Redis stream (the
worker's real sink), the collector storing them in SQLite as the web process runs it; step → stored latency
(p50, p95), and the collector's poll cost with many finished runs in the history.

Publishers run in separate processes (as workers do), so the collector's process has its GIL to itself.

    python benchmarks/collector_load.py [--workers 50] [--rate 10] [--seconds 15] [--history 1000]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.repo import Store  # noqa: E402
from workers import bus  # noqa: E402
from workers.collector import Collector  # noqa: E402
from workers.embedded_redis import EmbeddedRedis  # noqa: E402
from workers.events import EventPublisher  # noqa: E402

from event_latency import percentile  # noqa: E402  (this folder's own benchmark: one percentile rule)

PROCESSES = 2


def _publish(url: str, run_ids: list[str], rate: float, seconds: float) -> None:
    """One process of simulated workers: a thread a run, each logging `rate` steps a second, then succeeding."""
    def worker(run_id: str) -> None:
        publisher = EventPublisher(run_id, [bus.RedisStreamSink(bus.connect(url), run_id)])
        publisher.status("running", "simulated")
        start, step = time.monotonic(), 0
        while (elapsed := time.monotonic() - start) < seconds:
            step += 1
            publisher.emit("step", step=step, max_steps=10**6, loss=1.0 / step, learning_rate=1e-4, grad_norm=1.0,
                           epoch=step / 1000, tokens_seen=512 * step, tokens_per_second=5000.0, peak_memory_mb=100.0)
            time.sleep(max(0.0, step / rate - (time.monotonic() - start)))
        publisher.status("succeeded", "done")

    threads = [threading.Thread(target=worker, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0, help="steps a second per worker")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--history", type=int, default=1000, help="finished runs published before the load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis() as redis_server, \
            Store(f"sqlite:///{folder}/studio.db") as store:
        finished = [store.create_run({}, name=f"old {i}", model="tiny", adapter="lora", r=8).id
                    for i in range(args.history)]
        _publish(redis_server.url, finished, rate=1000.0, seconds=0.0)  # each: running, one step, succeeded
        stored: dict[tuple[str, int], float] = {}
        original = store.add_metric_points

        def timed(run_id, points):
            points = list(points)
            added = original(run_id, points)
            now = time.time()
            for point in points:
                if point["name"] == "loss":
                    stored.setdefault((run_id, point["step"]), now)
            return added

        store.add_metric_points = timed
        collector = Collector(store, redis_server.url).start()
        client = bus.connect(redis_server.url)
        while client.scard(bus.STREAMS_SET):  # the history is collected and leaves the poll set
            time.sleep(0.1)
        live = [store.create_run({}, name=f"live {i}", model="tiny", adapter="mora", r=8).id
                for i in range(args.workers)]
        chunks = [live[i::PROCESSES] for i in range(PROCESSES)]
        processes = [multiprocessing.Process(target=_publish, args=(redis_server.url, chunk, args.rate, args.seconds))
                     for chunk in chunks]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        deadline = time.monotonic() + 30
        while client.scard(bus.STREAMS_SET) and time.monotonic() < deadline:
            time.sleep(0.1)
        collector.stop()
        latencies = []
        for run_id in live:  # each event carries the publishing worker's clock in "time"
            for _, fields in client.xrange(bus.stream_key(run_id)):
                event = json.loads(fields["event"])
                if event["kind"] == "step" and (run_id, event["step"]) in stored:
                    latencies.append(1000 * (stored[(run_id, event["step"])] - event["time"]))
    total = len(latencies)
    print(f"# collector: {args.workers} workers x {args.rate:g} steps/s for {args.seconds:g} s, {args.history} "
          f"finished runs in the history, embedded Redis, SQLite (WAL)")
    print("| path | p50 ms | p95 ms | max ms | steps stored |")
    print("|---|---|---|---|---|")
    print(f"| step published -> point committed | {statistics.median(latencies):.0f} | "
          f"{percentile(latencies, 0.95):.0f} | {max(latencies):.0f} | {total} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
