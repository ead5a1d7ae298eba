"""The durable job queue with real parts: embedded Redis, real Celery worker processes, a SQLite store file, the
collector as the web process runs it. Fault tests: SIGKILL a worker, restart Redis, restart the collector."""
import os
import signal
import subprocess

import pytest

from app.service import ServiceError, StudioService
from storage.repo import TERMINAL_STATUSES
from tests.workers.queue_harness import HEARTBEAT_TTL_S, tiny_run_config, wait_for
from workers.events import read_events



@pytest.fixture()
def world(queue_world):
    return queue_world


def _service(world):
    return StudioService(world.store, runs_dir=world.root / "runs")


def _status(world, run_id):
    return world.store.get_run(run_id).status


def _wait_status(world, run_id, statuses, timeout=120):
    return wait_for(lambda: _status(world, run_id) in statuses and _status(world, run_id), timeout,
                    f"run {run_id} to reach {statuses}")


def _worker_steps(run):
    return [e for e in read_events(os.path.join(run.run_dir, "metrics.jsonl")) if e["kind"] == "step"]


def _stored_losses(world, run_id):
    return [(p.step, p.value) for p in world.store.metric_series([run_id], ["loss"])[run_id]["loss"]]


def test_submit_runs_and_the_curve_lands_in_storage(world, tmp_path):
    world.start_worker()
    world.start_collector()
    service = _service(world)
    run = service.submit(tiny_run_config(tmp_path), name="first")
    assert run.status == "queued"
    assert _wait_status(world, run.id, TERMINAL_STATUSES) == "succeeded"
    stored = world.store.get_run(run.id)
    assert stored.worker and stored.worker.startswith("train-test1@") and stored.step == 20
    losses = _stored_losses(world, run.id)
    assert [s for s, _ in losses] == list(range(1, 21))
    assert losses == [(e["step"], e["loss"]) for e in _worker_steps(stored)]
    artifact = world.store.get_artifacts(run.id)[0]
    assert artifact.kind == "adapter" and artifact.trainable_parameters > 0 and os.path.isdir(artifact.path)
    assert any("data:" in line.message for line in service.logs(run.id))


def test_twenty_submissions_at_once_are_all_recorded_and_run(world, tmp_path):
    world.start_worker()
    world.start_collector()
    service = _service(world)
    runs = [service.submit(tiny_run_config(tmp_path, max_steps=3, seed=i), name=f"run {i}") for i in range(20)]
    assert len({r.id for r in runs}) == 20 and len(world.store.list_runs()) == 20
    for run in runs:
        assert _wait_status(world, run.id, TERMINAL_STATUSES, timeout=300) == "succeeded"
        assert len(_stored_losses(world, run.id)) == 3


def test_cancel_a_queued_run_and_a_running_one(world, tmp_path):
    world.start_worker()
    world.start_collector()
    service = _service(world)
    long_run = service.submit(tiny_run_config(tmp_path, max_steps=5000), name="long")
    queued = service.submit(tiny_run_config(tmp_path), name="waiting")
    wait_for(lambda: (world.store.get_run(long_run.id).step or 0) >= 3, 120, "the long run to train")
    assert service.cancel(queued.id).status == "cancelled"
    assert service.cancel(long_run.id).status == "running"
    assert _wait_status(world, long_run.id, TERMINAL_STATUSES) == "cancelled"
    stopped = world.store.get_run(long_run.id)
    assert stopped.step < 5000 and os.path.isdir(os.path.join(stopped.run_dir, "adapter"))
    # the queued run's job reaches the worker after the long one and never starts
    marker = service.submit(tiny_run_config(tmp_path, max_steps=2), name="after")
    assert _wait_status(world, marker.id, TERMINAL_STATUSES) == "succeeded"
    assert _status(world, queued.id) == "cancelled"
    assert not _worker_steps(world.store.get_run(queued.id))
    with pytest.raises(ServiceError, match="only queued or running runs can be cancelled"):
        service.cancel(queued.id)


def test_sigkill_worker_mid_run_marks_it_lost_then_resume_completes(world, tmp_path):
    world.start_worker()
    world.start_collector(lost_after_s=3.0)
    service = _service(world)
    run = service.submit(tiny_run_config(tmp_path, max_steps=3000, save_steps=10), name="doomed")
    wait_for(lambda: (world.store.get_run(run.id).step or 0) >= 22, 120, "the run to pass step 22")
    worker = world.group.children["train-test1"]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert _wait_status(world, run.id, TERMINAL_STATUSES, timeout=60) == "failed"
    lost = world.store.get_run(run.id)
    assert lost.status_message == "worker lost"
    resumed = service.resume(run.id)
    assert resumed.parent_id == run.id
    world.start_worker()  # the resumed run continues from the parent's last checkpoint (a multiple of 10)
    wait_for(lambda: _worker_steps(world.store.get_run(resumed.id)) or _status(world, resumed.id) in TERMINAL_STATUSES, 120,
             "the resumed run's first step")
    assert _worker_steps(world.store.get_run(resumed.id)), world.store.get_run(resumed.id).status_message
    first_step = _worker_steps(world.store.get_run(resumed.id))[0]["step"]
    assert first_step % 10 == 1 and first_step > 10
    service.cancel(resumed.id)
    assert _wait_status(world, resumed.id, TERMINAL_STATUSES) == "cancelled"


def test_redis_restart_mid_run_loses_no_metric_point(world, tmp_path):
    world.start_worker()
    # the worker recreates its heartbeat within one beat of the restart; a threshold under one beat would call it lost
    world.start_collector(lost_after_s=2 * HEARTBEAT_TTL_S / 3)
    service = _service(world)
    run = service.submit(tiny_run_config(tmp_path, max_steps=300), name="through a restart")
    wait_for(lambda: (world.store.get_run(run.id).step or 0) >= 20, 120, "the run to pass step 20")
    port = world.redis.port
    world.redis.stop()
    subprocess.run(["sleep", "1"], check=True)
    world.redis.port = port
    world.redis.start()
    assert _wait_status(world, run.id, TERMINAL_STATUSES, timeout=180) == "succeeded"
    finished = world.store.get_run(run.id)
    expected = [(e["step"], e["loss"]) for e in _worker_steps(finished)]
    assert len(expected) == 300
    wait_for(lambda: len(_stored_losses(world, run.id)) == 300, 30, "every point to be stored")
    assert _stored_losses(world, run.id) == expected


def test_collector_stopped_mid_run_catches_up_without_duplicates(world, tmp_path):
    world.start_worker()
    world.start_collector()
    service = _service(world)
    run = service.submit(tiny_run_config(tmp_path, max_steps=200), name="while the web is down")
    wait_for(lambda: (world.store.get_run(run.id).step or 0) >= 10, 120, "the run to pass step 10")
    world.stop_collector()
    seen_while_down = world.store.get_run(run.id).step
    wait_for(lambda: len(_worker_steps(world.store.get_run(run.id))) >= seen_while_down + 30, 120,
             "the worker to go on while nothing collects")
    world.start_collector()
    assert _wait_status(world, run.id, TERMINAL_STATUSES, timeout=120) == "succeeded"
    expected = [(e["step"], e["loss"]) for e in _worker_steps(world.store.get_run(run.id))]
    wait_for(lambda: len(_stored_losses(world, run.id)) == len(expected), 30, "catch-up")
    assert _stored_losses(world, run.id) == expected
    assert world.store.metric_count(run.id) == len(expected) * 5  # loss, lr, grad norm, tokens/s, memory: once each
