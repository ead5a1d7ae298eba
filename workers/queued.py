"""A training run as the queue runs it: the engine's `run_training`, plus what a shared, failure-prone world needs.

- events also go to the run's Redis stream (and always to the run folder's metrics.jsonl);
- a cancel flag in Redis is checked between steps, and before the run starts (a cancelled queued run never starts);
- a heartbeat key says the worker is alive, so the collector can mark a run whose worker died;
- a redelivered job (its worker died before acknowledging) finds its run already ended and does nothing;
- the heartbeat key is taken with SET NX before training, so a task sent twice (the reconciler re-sends queued runs
  after a Redis restart) trains once: the second worker finds the run held and does nothing.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

import redis
import torch

from workers import bus
from workers.celery_app import TRAIN_QUEUE
from workers.events import EventPublisher, JsonlSink
from workers.formatting import format_bytes
from workers.settings import train_memory_limit_gb
from workers.train_config import TrainConfig
from storage.statuses import TERMINAL_STATUSES
from workers.job_process import JobExit, killed_message, run_in_child
from workers.training import LOWER_MEMORY, latest_checkpoint, record_failure, run_training

def _flag_checker(client: redis.Redis, run_id: str):
    def should_stop() -> bool:
        try:
            return bus.cancel_requested(client, run_id)
        except redis.RedisError:
            return False  # Redis is restarting; the flag will be seen at a later step

    return should_stop


def run_queued_training(url: str, run_id: str, config: dict[str, Any], run_dir: str, resume_from: Optional[str],
                        worker: str) -> str:
    """Run one queued job, in a child process (workers.job_process), and return its final status."""
    client = bus.connect(url)
    previous = bus.get_state(client, run_id)
    if previous in TERMINAL_STATUSES:
        return previous
    publisher = EventPublisher(run_id, [JsonlSink(Path(run_dir) / "metrics.jsonl"), bus.RedisStreamSink(client, run_id)])
    if bus.cancel_requested(client, run_id):
        publisher.status("cancelled", "cancelled before it started")
        bus.set_state(client, run_id, "cancelled")
        return "cancelled"
    if not client.set(bus.heartbeat_key(run_id), worker, nx=True, ex=bus.HEARTBEAT_TTL_S):
        return "running"  # another worker holds it (the task was sent again after a Redis restart): never train twice
    bus.set_state(client, run_id, "running")
    checkpoint = latest_checkpoint(Path(resume_from)) if resume_from else None
    with bus.Heartbeat(client, run_id, worker):
        limit_gb = train_memory_limit_gb()
        ended = run_in_child(train_in_child, (url, run_id, config, run_dir, str(checkpoint or ""), worker),
                             on_start=lambda pid: publisher.log(f"training in process {pid} on {worker}"),
                             memory_limit_bytes=int(limit_gb * 2**30) if limit_gb else None)
    status = None if ended.over_limit else STATUS_BY_EXIT_CODE.get(ended.code)
    if status is None:
        status = "failed"
        record_failure(Path(run_dir), publisher, _ended_message(ended, limit_gb))
    bus.set_state(client, run_id, status)
    return status


def _ended_message(ended: JobExit, limit_gb: Optional[float]) -> str:
    if ended.over_limit:
        return (f"the training job held {format_bytes(ended.rss_bytes, 'GiB')}, over this worker's limit of {limit_gb:g} "
                f"GiB (MORA_TRAIN_MEMORY_LIMIT_GB), and was stopped: {LOWER_MEMORY}")
    return killed_message(ended.code, LOWER_MEMORY)


EXIT_CODE_BY_STATUS = {"succeeded": 0, "failed": 10, "cancelled": 11}
STATUS_BY_EXIT_CODE = {code: status for status, code in EXIT_CODE_BY_STATUS.items()}


def train_in_child(url: str, run_id: str, config: dict[str, Any], run_dir: str, checkpoint: str, worker: str) -> int:
    """The child's side: train, publishing to the run's stream, and say how it ended by the exit code (the run's own
    events already carry its message)."""
    client = bus.connect(url)
    result = run_training(TrainConfig.from_dict(config), Path(run_dir), run_id=run_id,
                          sinks=[bus.RedisStreamSink(client, run_id)], should_stop=_flag_checker(client, run_id),
                          resume_from=Path(checkpoint) if checkpoint else None, worker=worker)
    return EXIT_CODE_BY_STATUS[result.status]


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
        device = describe_device(trains=TRAIN_QUEUE in self.queues)
        while not self._stop.is_set():
            try:
                bus.announce_worker(self.client, self.name, {"queues": self.queues, **device})
            except redis.RedisError:
                pass
            self._stop.wait(bus.WORKER_TTL_S / 3)


def describe_device(trains: bool = False) -> dict[str, Any]:
    """The device a worker computes on; a training worker's CPU memory is its jobs' limit where one is set."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "kind": "cuda"}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    limit = train_memory_limit_gb() if trains else None
    return {"device": f"CPU ({os.cpu_count()} cores)", "memory_gb": round(min(memory, limit or memory), 1),
            "kind": "cpu"}
