"""Real parts for queue tests: an embedded Redis on a free port (never a user's Redis), real `celery worker`
processes with the tiny model, a SQLite store file, and the collector running as in the web process."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from storage.repo import Store
from workers import bus
from workers.collector import Collector
from workers.embedded_redis import EmbeddedRedis
from workers.celery_app import CHAT_QUEUE
from workers.processes import CHAT_SLOTS, ProcessGroup, WorkerSpec, celery_command, worker_env
from tests.workers.sample_data import write_dataset


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class QueueWorld:
    root: Path
    redis: EmbeddedRedis
    store: Store
    group: ProcessGroup
    env: dict[str, str]
    collector: Collector | None = None
    workers_started: int = 0

    def start_worker(self, queue: str = "train") -> str:
        self.workers_started += 1
        name = f"{queue}-test{self.workers_started}"
        spec = WorkerSpec(name, queue, slots=CHAT_SLOTS if queue == CHAT_QUEUE else 1)  # as `up` starts them
        self.group.spawn(name, celery_command(spec), worker_env(spec, self.env))
        client = bus.connect(self.redis.url)
        wait_for(lambda: any(w["name"].startswith(name + "@") for w in bus.list_workers(client)), 60,
                 f"worker {name} to announce itself")
        return name

    def start_collector(self, lost_after_s: float = 3.0) -> Collector:
        self.collector = Collector(self.store, self.redis.url, block_ms=100, lost_after_s=lost_after_s,
                                   lost_check_every_s=0.5).start()
        return self.collector

    def stop_collector(self) -> None:
        if self.collector is not None:
            self.collector.stop()
            self.collector = None

    def close(self) -> None:
        self.stop_collector()
        self.group.stop(timeout=10)
        self.redis.stop()
        self.store.close()


HEARTBEAT_TTL_S = 5  # the workers' heartbeat here (default 15): a killed worker's run is noticed 10 s sooner


def make_world(root: Path, tiny_model_dir: Path) -> QueueWorld:
    redis = EmbeddedRedis().start()
    env = {**os.environ, "REDIS_URL": redis.url, "MORA_DATA_DIR": str(root / "data"),
           "MORA_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
           "MORA_MODELS_DIR": str(Path(tiny_model_dir).parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    os.environ["REDIS_URL"] = redis.url  # the service sends jobs to the Redis named here
    store = Store(f"sqlite:///{root / 'studio.db'}")
    return QueueWorld(root, redis, store, ProcessGroup(root / "logs"), env)


def tiny_run_config(tmp_path: Path, **overrides) -> dict:
    """Train settings for a short run of the tiny model on the sample chat data (written once into `tmp_path`)."""
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        write_dataset(tmp_path, "chat")
    values = dict(data=str(data), model="tiny-llama", adapter="mora", r=8, max_steps=20, batch_size=4, max_length=64,
                  learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
    values.update(overrides)
    return values
