"""Nothing queued forever: a run whose task cannot be sent is not left `queued`, and queued runs whose task a Redis
restart erased are sent again, once each."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.service import StudioService
from tests.app.test_up import ROOT, studio_env
from storage.repo import TERMINAL_STATUSES
from tests.workers.queue_harness import tiny_run_config, wait_for
from workers import api, bus
from workers.celery_app import sent_key
from workers.embedded_redis import free_port
from workers.events import read_events
from workers.reconciler import Reconciler



def test_submit_with_redis_down_says_so_in_one_line_and_leaves_no_run(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path, max_steps=3)))
    env = studio_env(tmp_path, free_port(), MORA_MODELS_DIR=str(Path(tiny_model_dir).parent))
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    submit = subprocess.run([sys.executable, "-m", "app.cli", "submit", str(config)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert submit.returncode == 2, submit.stderr
    assert submit.stdout == ""
    lines = submit.stderr.strip().splitlines()
    assert len(lines) == 1, submit.stderr
    assert lines[0].startswith("mora-studio submit: the run was not queued: cannot reach the queue's Redis at "
                               "redis://127.0.0.1:")
    assert "mora-studio up" in lines[0] and "REDIS_URL" in lines[0] and "Traceback" not in submit.stderr
    runs = subprocess.run([sys.executable, "-m", "app.cli", "runs"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert runs.returncode == 0 and runs.stdout.strip().splitlines()[1:] == [], runs.stdout
    assert not list((tmp_path / "data" / "runs").glob("*"))


@pytest.fixture()
def world(queue_world):
    return queue_world


def _restart_redis(world) -> None:
    """Stop the embedded Redis and start it again on its port: it comes back empty, as under `mora-studio up`."""
    port = world.redis.port
    world.redis.stop()
    world.redis.port = port
    world.redis.start()


def test_queued_runs_lost_in_a_redis_restart_are_sent_again_and_each_trains_once(world, tmp_path):
    service = StudioService(world.store, runs_dir=world.root / "runs")
    steps = [400, 3, 3]  # the first trains long enough for its duplicate to reach the other worker meanwhile
    runs = [service.submit(tiny_run_config(tmp_path, seed=i, max_steps=n), name=f"queued {i}") for i, n in enumerate(steps)]
    client = bus.connect(world.redis.url)
    assert all(client.exists(sent_key(run.id)) for run in runs)
    _restart_redis(world)  # no worker yet: the three tasks are lost with it
    client = bus.connect(world.redis.url)
    assert client.llen("train") == 0 and not any(client.exists(sent_key(run.id)) for run in runs)
    reconciler = Reconciler(world.store, world.redis.url, every_s=0.3).start()
    try:
        wait_for(lambda: all(client.exists(sent_key(run.id)) for run in runs), 30, "the runs to be sent again")
        world.start_collector()
        world.start_worker()
        world.start_worker()
        # a duplicate of the long run, as a re-send racing a worker leaves: it reaches the second worker meanwhile
        api.submit_training(runs[0].id, runs[0].config, runs[0].run_dir)
        long_run = world.store.get_run(runs[0].id)
        assert long_run.status in ("queued", "running"), long_run.status_message
        for run in runs:
            assert wait_for(lambda: world.store.get_run(run.id).status in TERMINAL_STATUSES and
                            world.store.get_run(run.id).status, 180, f"run {run.id} to end") == "succeeded"
    finally:
        reconciler.stop()
    for run, n in zip(runs, steps):
        events = read_events(Path(run.run_dir) / "metrics.jsonl")
        assert [e["status"] for e in events if e["kind"] == "status"] == ["running", "succeeded"], run.id
        assert [e["step"] for e in events if e["kind"] == "step"] == list(range(1, n + 1))
    assert reconciler.check_once() == [] and reconciler.check_once() == []  # nothing queued: nothing sent
