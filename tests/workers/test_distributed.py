"""One run on two devices, as a worker runs it: two processes under torchrun on the gloo backend (the CPU's DDP),
against one process with the same global batch; cancelled, then resumed from the checkpoint the cancel wrote. Real
parts: the worker's own `run_queued_training` (torchrun as its child), an embedded Redis for the stream and the cancel
flag, and the tiny model.

Tolerance: the two-process run does the same arithmetic as the one-process run (the Trainer sums the loss over the
global batch's tokens and DDP all-reduces the gradients), except the order of float32 additions: each rank sums its
half, then gloo adds the halves. Reordering a float32 sum changes it by a few units of 2^-24 of its terms, and Adam
carries such differences from step to step; 1e-4 absolute on losses near 5 is what the resume test allows for the
same cause (observed here: at most 2e-6).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.workers.queue_harness import tiny_run_config, wait_for
from workers import bus, distributed
from workers.embedded_redis import EmbeddedRedis
from workers.events import read_events
from workers.queued import run_queued_training
from workers.train_config import TrainConfig
from workers.training import latest_checkpoint, run_training

STEPS = 30


@pytest.fixture
def redis_url():
    server = EmbeddedRedis().start()
    yield server.url
    server.stop()


def _losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "step"}


def _config(tmp_path, tiny_model_dir, **overrides) -> dict:
    return tiny_run_config(tmp_path, model=str(tiny_model_dir), **{"max_steps": STEPS, **overrides})


def test_two_gloo_processes_train_as_one_then_cancel_and_resume(tmp_path, tiny_model_dir, redis_url):
    one = run_training(TrainConfig.from_dict(_config(tmp_path, tiny_model_dir, batch_size=4)), tmp_path / "one")
    assert one.status == "succeeded", one.message
    expected = _losses(tmp_path / "one")

    client = bus.connect(redis_url)
    config = _config(tmp_path, tiny_model_dir, batch_size=2, devices=2)
    first = tmp_path / "ddp"
    ended: dict[str, str] = {}
    job = threading.Thread(target=lambda: ended.update(status=run_queued_training(
        redis_url, "ddp", config, str(first), None, "worker-test")))
    job.start()
    wait_for(lambda: len(_losses(first)) >= 3 or not job.is_alive(), 180, "the two-device run's third step")
    bus.request_cancel(client, "ddp")
    job.join(120)
    assert ended["status"] == "cancelled", read_events(first / "metrics.jsonl")[-3:]
    stopped = _losses(first)
    last = max(stopped)
    assert 3 <= last < STEPS and sorted(stopped) == list(range(1, last + 1))  # one voice: each step once
    for step, loss in stopped.items():
        assert loss == pytest.approx(expected[step], abs=1e-4), (step, loss, expected[step])
    events = read_events(first / "metrics.jsonl")
    assert [e["status"] for e in events if e["kind"] == "status"] == ["running", "cancelled"]
    assert (first / "rank-1.jsonl").exists() and (first / "adapter").is_dir()
    assert latest_checkpoint(first).name == f"checkpoint-{last}"  # the cancel saved where every rank stopped

    second = tmp_path / "ddp-resumed"
    bus.connect(redis_url).delete(bus.cancel_key("ddp-2"))
    status = run_queued_training(redis_url, "ddp-2", config, str(second), str(first), "worker-test")
    assert status == "succeeded", read_events(second / "metrics.jsonl")[-3:]
    resumed = _losses(second)
    assert sorted(resumed) == list(range(last + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-4), (step, loss, expected[step])
    result = json.loads((second / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps"] == STEPS and Path(result["output_dir"]).is_dir()


def test_a_run_asking_for_devices_outside_a_launcher_fails_with_the_reason(tmp_path, tiny_model_dir):
    result = run_training(TrainConfig.from_dict(_config(tmp_path, tiny_model_dir, devices=2)), tmp_path / "run")
    assert result.status == "failed"
    assert "asks for 2 devices but was started as 1 process" in result.message and "torchrun" in result.message


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow  # about 45 s on the 2-core machine: the job must be running before the worker is killed
def test_a_killed_worker_takes_its_two_device_job_with_it(tmp_path, tiny_model_dir, redis_url):
    """The worker (here a process running `run_queued_training`, as a Celery worker does) is killed with SIGKILL, as
    the OOM killer would: torchrun gets SIGTERM from its parent-death signal and ends both ranks; nothing is left
    training a run that the collector will mark lost."""
    config = _config(tmp_path, tiny_model_dir, batch_size=2, devices=2, max_steps=100_000, save_steps=0)
    run_dir = tmp_path / "run"
    script = ("import json, sys; from workers.queued import run_queued_training; "
              "run_queued_training(sys.argv[1], 'killed', json.loads(sys.argv[2]), sys.argv[3], None, 'worker-test')")
    worker = subprocess.Popen([sys.executable, "-c", script, redis_url, json.dumps(config), str(run_dir)],
                              cwd=Path(__file__).resolve().parents[2], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: len(_losses(run_dir)) >= 2 or worker.poll() is not None, 180, "the job's second step")
        started = [e["message"] for e in read_events(run_dir / "metrics.jsonl") if "(torchrun" in e.get("message", "")]
        job = distributed.job_processes(int(started[0].split("(torchrun, process ")[1].split(")")[0]))
        assert len(job) >= 3  # torchrun and its two ranks
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        wait_for(lambda: not any(_alive(pid) for pid in job), 60, "torchrun and both ranks to end")
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_worker_of_four_gpus_lends_them_first_come_first_served():
    """`--gpus 0,1,2,3` is one worker of four slots; a 4-GPU job waits for all four, and a 1-GPU job that came after
    it waits behind it even while GPUs are free, so a large job is never starved by small ones."""
    from workers.processes import celery_command, worker_specs
    from workers.queued import DevicePool

    (spec,) = [s for s in worker_specs(["train"], ["0", "1", "2", "3"])]
    assert (spec.name, spec.gpu, spec.slots) == ("train-gpu0-1-2-3", "0,1,2,3", 4)
    assert celery_command(spec)[celery_command(spec).index("--pool") + 1:][:3] == ["threads", "--concurrency", "4"]
    assert "solo" in celery_command(worker_specs(["train"], ["0"])[0])

    pool = DevicePool(["0", "1", "2", "3"])
    first, second = pool.acquire(1), pool.acquire(1)
    assert (first, second) == (["0"], ["1"])
    granted: dict[str, list[str]] = {}
    big = threading.Thread(target=lambda: granted.update(big=pool.acquire(4, poll_s=0.05)))
    big.start()
    wait_for(lambda: len(pool._waiting) == 1, 10, "the 4-GPU job to wait")
    small = threading.Thread(target=lambda: granted.update(small=pool.acquire(1, poll_s=0.05)))
    small.start()
    wait_for(lambda: len(pool._waiting) == 2, 10, "the 1-GPU job to queue behind it")
    assert granted == {}  # two GPUs are free, but the 1-GPU job came second
    pool.release(first)
    pool.release(second)
    big.join(10)
    assert granted == {"big": ["0", "1", "2", "3"]}
    pool.release(granted["big"])
    small.join(10)
    assert granted["small"] == ["0"]
    cancelled = DevicePool(["0"])
    cancelled.acquire(1)
    assert cancelled.acquire(1, give_up=lambda: True) is None  # a run cancelled while it waited never starts
