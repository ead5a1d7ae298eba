"""A training run as the queue runs it: the engine's `run_training`, plus what a shared, failure-prone world needs.

- events also go to the run's Redis stream (and always to the run folder's metrics.jsonl);
- a cancel flag in Redis is checked between steps, and before the run starts (a cancelled queued run never starts);
- a heartbeat key says the worker is alive, so the collector can mark a run whose worker died;
- a redelivered job (its worker died before acknowledging) finds its run already ended and does nothing;
- the heartbeat key is taken with SET NX before training, so a task sent twice (the reconciler re-sends queued runs
  after a Redis restart) trains once: the second worker finds the run held and does nothing.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Optional

import redis
import torch

from workers import bus, distributed
from workers.celery_app import TRAIN_QUEUE
from workers.events import EventPublisher, JsonlSink
from workers.formatting import format_bytes
from workers.settings import heartbeat_ttl_s, train_memory_limit_gb, worker_gpus
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
    if not client.set(bus.heartbeat_key(run_id), worker, nx=True, ex=math.ceil(heartbeat_ttl_s())):
        return "running"  # another worker holds it (the task was sent again after a Redis restart): never train twice
    bus.set_state(client, run_id, "running")
    checkpoint = latest_checkpoint(Path(resume_from)) if resume_from else None
    devices = int(config.get("devices") or 1)
    with bus.Heartbeat(client, run_id, worker):
        pool = device_pool()
        if pool.gpus and devices > len(pool.gpus):
            status, problem = None, (f"this run asks for {devices} devices and {worker} has {len(pool.gpus)} GPUs "
                                     f"({','.join(pool.gpus)}): lower devices or start a worker with more --gpus")
        else:
            gpus = pool.acquire(devices, give_up=_flag_checker(client, run_id))
            if gpus is None:
                publisher.status("cancelled", "cancelled while waiting for devices")
                bus.set_state(client, run_id, "cancelled")
                return "cancelled"
            try:
                status, problem = _run_job(publisher, (url, run_id, config, run_dir, str(checkpoint or ""), worker),
                                           devices, gpus)
            finally:
                pool.release(gpus)
    if status is None:
        status = "failed"
        record_failure(Path(run_dir), publisher, problem)
    bus.set_state(client, run_id, status)
    return status


def _run_job(publisher: EventPublisher, args: tuple, devices: int, gpus: list[str]) -> tuple[Optional[str], str]:
    """Train in a child process (one device) or under torchrun (several); (its status, "") when it ended as it
    should, else (None, why)."""
    run_dir, worker = Path(args[3]), args[5]
    limit_gb = train_memory_limit_gb()
    limit = int(limit_gb * 2**30) if limit_gb else None
    where = f"{worker}{' on GPU ' + ','.join(gpus) if gpus else ''}"
    if devices == 1:
        ended = run_in_child(train_in_child, (*args, ",".join(gpus)),
                             on_start=lambda pid: publisher.log(f"training in process {pid} on {where}"),
                             memory_limit_bytes=limit)
        status = None if ended.over_limit else STATUS_BY_EXIT_CODE.get(ended.code)
        return status, "" if status else _ended_message(ended, limit_gb)
    (run_dir / distributed.RESULT).unlink(missing_ok=True)
    launch_file = run_dir / "launch.json"
    launch_file.write_text(json.dumps(dict(zip(("url", "run_id", "config", "run_dir", "checkpoint", "worker"), args))))
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
    process = distributed.start_job(
        distributed.launch_command(devices, ["workers.distributed", "queued", str(launch_file)]), env=env,
        log_file=run_dir / "launcher.log")
    publisher.log(f"training on {devices} devices (torchrun, process {process.pid}) on {where}")
    code, held = distributed.wait_for_job(process, limit)
    if held:
        return None, _ended_message(JobExit(-9, True, held), limit_gb)
    return distributed.job_outcome(code, run_dir, devices)


def _ended_message(ended: JobExit, limit_gb: Optional[float]) -> str:
    if ended.over_limit:
        return (f"the training job held {format_bytes(ended.rss_bytes, 'GiB')}, over this worker's limit of {limit_gb:g} "
                f"GiB (MORA_TRAIN_MEMORY_LIMIT_GB), and was stopped: {LOWER_MEMORY}")
    return killed_message(ended.code, LOWER_MEMORY)


EXIT_CODE_BY_STATUS = {"succeeded": 0, "failed": 10, "cancelled": 11}
STATUS_BY_EXIT_CODE = {code: status for status, code in EXIT_CODE_BY_STATUS.items()}


def train_in_child(url: str, run_id: str, config: dict[str, Any], run_dir: str, checkpoint: str, worker: str,
                   gpus: str = "") -> int:
    """The child's side (or one rank's, under torchrun): train, publishing to the run's stream, and say how it ended
    by the exit code (the run's own events already carry its message). `gpus`: the GPU the worker lent this job, set
    before anything touches CUDA (the forkserver never does)."""
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    client = bus.connect(url)
    result = run_training(TrainConfig.from_dict(config), Path(run_dir), run_id=run_id,
                          sinks=[bus.RedisStreamSink(client, run_id)], should_stop=_flag_checker(client, run_id),
                          resume_from=Path(checkpoint) if checkpoint else None, worker=worker)
    if distributed.rank_and_world()[1] > 1:  # torchrun stops every rank once one exits non-zero: only for a failure
        return EXIT_CODE_BY_STATUS["failed"] if result.status == "failed" else 0
    return EXIT_CODE_BY_STATUS[result.status]


class DevicePool:
    """The GPUs a training worker owns (`mora-studio worker --gpus 0,1,2,3`: MORA_GPUS), lent to its jobs first come,
    first served: four 1-GPU jobs run side by side, a 4-GPU job waits until all four are free, and jobs that came
    after it wait behind it, so a large job is never starved by small ones. A CPU worker owns no GPUs: a job of N
    devices there is N CPU processes, and nothing is lent."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus = list(gpus)
        self._free = list(gpus)
        self._waiting: list[object] = []
        self._changed = threading.Condition()

    def acquire(self, count: int, give_up=lambda: False, poll_s: float = 1.0) -> Optional[list[str]]:
        """`count` GPUs (none on a CPU worker), once it is this job's turn and they are free; None if `give_up()`
        turned true while waiting (the run was cancelled)."""
        if not self.gpus:
            return []
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or len(self._free) < count:
                    if give_up():
                        return None
                    self._changed.wait(poll_s)
                taken, self._free = self._free[:count], self._free[count:]
                return taken
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()

    def release(self, gpus: list[str]) -> None:
        with self._changed:
            self._free = sorted(self._free + list(gpus), key=self.gpus.index)
            self._changed.notify_all()


_POOL: list[DevicePool] = []


def device_pool() -> DevicePool:
    if not _POOL:
        _POOL.append(DevicePool(worker_gpus()))
    return _POOL[0]


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
    """The device a worker computes on (memory of one device), how many GPUs it owns, and for a training worker
    why it cannot hold a quantised base (None: it can); a training worker's CPU memory is its jobs' limit where one
    is set."""
    from workers.quantization import backend_problem

    # what the Train tab offers: devices up to `gpus` for one run, quantised bases where `quantization` is empty
    extra = {"quantization_problem": backend_problem()} if trains else {}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "kind": "cuda",
                "gpus": torch.cuda.device_count(), **extra}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    limit = train_memory_limit_gb() if trains else None
    return {"device": f"CPU ({os.cpu_count()} cores)", "memory_gb": round(min(memory, limit or memory), 1),
            "kind": "cpu", "gpus": 0, **extra}
