"""A training job that dies costs its run, never its worker: each job runs in a child process of the worker, so the
kernel's OOM kill (a SIGKILL) of a job fails that run at once with what to lower, and the same worker takes the next
job; a job over the worker's memory limit fails with "ran out of memory"; a killed worker takes its job with it."""
import os
import re
import signal
import time

import pytest

from app.service import StudioService
from storage.repo import TERMINAL_STATUSES
from tests.workers.queue_harness import tiny_run_config, wait_for
from workers import api
from workers.events import read_events


@pytest.fixture()
def world(queue_world):
    return queue_world


def _final(world, run_id, timeout=120):
    return wait_for(lambda: (run := world.store.get_run(run_id)).status in TERMINAL_STATUSES and run, timeout,
                    f"run {run_id} to end")


def _job_pid(service, run_id):
    for line in service.logs(run_id):
        found = re.search(r"training in process (\d+)", line.message)
        if found:
            return int(found.group(1))
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_job_fails_its_run_at_once_and_the_worker_takes_the_next(world, tmp_path):
    world.start_worker()
    world.start_collector(lost_after_s=60)  # a lost *worker* would take a minute: the run must not wait for that
    service = StudioService(world.store, runs_dir=world.root / "runs")
    worker = world.group.children["train-test1"]
    run = service.submit(tiny_run_config(tmp_path, max_steps=3000, save_steps=10), name="oom-killed")
    wait_for(lambda: (world.store.get_run(run.id).step or 0) >= 12, 120, "the run to pass step 12")
    job = wait_for(lambda: _job_pid(service, run.id), 30, "the job's process id in the run's log")
    assert job != worker.pid
    killed = time.monotonic()
    os.kill(job, signal.SIGKILL)
    failed = _final(world, run.id, timeout=30)
    print(f"run marked failed {time.monotonic() - killed:.2f} s after kill -9 of its job")
    assert failed.status == "failed"
    assert failed.status_message.startswith("the training process was killed by signal 9 (SIGKILL), most likely by "
                                            "the kernel's out-of-memory killer: lower batch_size or max_length")
    assert worker.poll() is None, "the worker itself must survive its job"
    after = service.submit(tiny_run_config(tmp_path, max_steps=3), name="next job")
    assert _final(world, after.id).status == "succeeded"
    assert world.store.get_run(after.id).worker == failed.worker
    resumed = service.resume(run.id)  # the killed run resumes from its last complete checkpoint
    wait_for(lambda: [e for e in read_events(os.path.join(resumed.run_dir, "metrics.jsonl")) if e["kind"] == "step"],
             120, "the resumed run's first step")
    first = [e for e in read_events(os.path.join(resumed.run_dir, "metrics.jsonl")) if e["kind"] == "step"][0]
    assert first["step"] > 10 and first["step"] % 10 == 1
    service.cancel(resumed.id)
    assert _final(world, resumed.id).status == "cancelled"


def test_a_killed_worker_takes_its_job_process_with_it(world, tmp_path):
    world.start_worker()
    world.start_collector(lost_after_s=3)
    service = StudioService(world.store, runs_dir=world.root / "runs")
    run = service.submit(tiny_run_config(tmp_path, max_steps=3000), name="orphan?")
    wait_for(lambda: (world.store.get_run(run.id).step or 0) >= 3, 120, "the run to train")
    job = wait_for(lambda: _job_pid(service, run.id), 30, "the job's process id")
    worker = world.group.children["train-test1"]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_for(lambda: not _alive(job), 10, "the orphaned job to exit")
    assert _final(world, run.id, timeout=60).status_message == "worker lost"


def test_a_job_over_the_memory_limit_fails_with_what_to_lower(world, tmp_path):
    world.env["MORA_TRAIN_MEMORY_LIMIT_GB"] = "1"
    world.start_worker()
    world.start_collector()
    long_rows = tmp_path / "long.jsonl"
    long_rows.write_text("".join('{"text": "%s"}\n' % " ".join(f"word{i % 97}" for i in range(4000))
                                 for _ in range(64)))
    # sent to the queue directly, as a run whose estimate was wrong would be: the service's pre-flight would refuse it
    config = tiny_run_config(tmp_path, data=str(long_rows), batch_size=64, max_length=4096, max_steps=2)
    run = world.store.create_run(config, name="too big", model="tiny-llama", adapter="mora", r=8)
    run_dir = world.root / "runs" / run.id
    run_dir.mkdir(parents=True)
    world.store.set_output(run.id, run_dir=str(run_dir))
    api.submit_training(run.id, config, str(run_dir))
    failed = _final(world, run.id, timeout=180)
    assert failed.status == "failed"
    held = re.fullmatch(r"the training job held (\d+\.\d) GiB, over this worker's limit of 1 GiB "
                        r"\(MORA_TRAIN_MEMORY_LIMIT_GB\), and was stopped: lower batch_size or max_length, or enable "
                        r"gradient_checkpointing", failed.status_message)
    assert held and float(held.group(1)) >= 1.0, failed.status_message
    again = StudioService(world.store, runs_dir=world.root / "runs").submit(tiny_run_config(tmp_path, max_steps=2))
    assert _final(world, again.id).status == "succeeded"
    workers = {w["name"]: w for w in api.workers()}
    assert [w["memory_gb"] for w in workers.values()] == [1.0]
