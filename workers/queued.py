"""A training run as the queue runs it: the engine's `run_training`, plus what a shared, failure-prone world needs.

- events also go to the run's Redis stream (and always to the run folder's metrics.jsonl);
- a cancel flag in Redis is checked between steps, and before the run starts (a cancelled queued run never starts);
- a heartbeat key says the worker is alive, so the collector can mark a run whose worker died;
- a redelivered job (its worker died before acknowledging) finds its run already ended and does nothing;
- the heartbeat key is taken with SET NX before training, so a task sent twice (the reconciler re-sends queued runs
  after a Redis restart) trains once: the second worker finds the run held and does nothing.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import redis

from workers import bus
from workers.events import EventPublisher, JsonlSink
from workers.train_config import TrainConfig
from workers.training import latest_checkpoint, run_training  # at worker start-up, not at the first job's pickup

TERMINAL = ("succeeded", "failed", "cancelled")


def _flag_checker(client: redis.Redis, run_id: str):
    def should_stop() -> bool:
        try:
            return bus.cancel_requested(client, run_id)
        except redis.RedisError:
            return False  # Redis is restarting; the flag will be seen at a later step

    return should_stop


def run_queued_training(url: str, run_id: str, config: dict[str, Any], run_dir: str, resume_from: Optional[str],
                        worker: str) -> str:
    """Run one queued job and return its final status."""
    client = bus.connect(url)
    previous = bus.get_state(client, run_id)
    if previous in TERMINAL:
        return previous
    sink = bus.RedisStreamSink(client, run_id)
    if bus.cancel_requested(client, run_id):
        publisher = EventPublisher(run_id, [JsonlSink(Path(run_dir) / "metrics.jsonl"), sink])
        publisher.status("cancelled", "cancelled before it started")
        bus.set_state(client, run_id, "cancelled")
        return "cancelled"
    if not client.set(bus.heartbeat_key(run_id), worker, nx=True, ex=bus.HEARTBEAT_TTL_S):
        return "running"  # another worker holds it (the task was sent again after a Redis restart): never train twice
    bus.set_state(client, run_id, "running")
    checkpoint = latest_checkpoint(Path(resume_from)) if resume_from else None
    with bus.Heartbeat(client, run_id, worker):
        result = run_training(TrainConfig.from_dict(config), Path(run_dir), run_id=run_id, sinks=[sink],
                              should_stop=_flag_checker(client, run_id), resume_from=checkpoint,
                              worker=worker)
    bus.set_state(client, run_id, result.status)
    return result.status


class WorkerPresence:
    """Announces this worker's device and queues every few seconds, for the System tab."""

    def __init__(self, url: str, name: str, queues: list[str]) -> None:
        self.client, self.name, self.queues = bus.connect(url), name, queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="worker-presence")

    def start(self) -> "WorkerPresence":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        device = describe_device()
        while not self._stop.is_set():
            try:
                bus.announce_worker(self.client, self.name, {"queues": self.queues, **device})
            except redis.RedisError:
                pass
            self._stop.wait(bus.WORKER_TTL_S / 3)


def describe_device() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "kind": "cuda"}
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"device": f"CPU ({os.cpu_count()} cores)", "memory_gb": round(memory, 1), "kind": "cpu"}
