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
    return tiny_run_config(tmp_path, model=str(tiny_model_dir), max_steps=STEPS, **overrides)


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
