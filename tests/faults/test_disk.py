"""Disk that does not fill: a run keeps its newest checkpoints and the best by eval loss, still resumes, and the
studio shows what each run and the data folder use."""
import json
from pathlib import Path

from workers.events import read_events
from workers.train_config import ConfigError, TrainConfig
from workers.training import checkpoints_to_delete, latest_checkpoint, run_training
from tests.workers.sample_data import write_dataset

import pytest


def _config(tiny_model_dir, data, **overrides) -> TrainConfig:
    values = dict(data=str(data), model=str(tiny_model_dir), adapter="lora", r=4, max_steps=60, batch_size=4,
                  max_length=64, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", eval_fraction=0.25,
                  eval_steps=10, save_steps=10, keep_checkpoints=2)
    values.update(overrides)
    return TrainConfig(**values)


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_prune_keeps_the_newest_and_the_best_and_never_the_newest_complete(tmp_path):
    steps = [_checkpoint(tmp_path, s) for s in (10, 20, 30, 40, 50)]
    leftover = _checkpoint(tmp_path, 35, complete=False)  # a killed save
    in_progress = _checkpoint(tmp_path, 60, complete=False)  # newer than every complete one: not ours to judge
    losses = {10: 1.0, 20: 0.4, 30: 0.9, 40: 0.8, 50: 0.7}
    deleted = checkpoints_to_delete([*steps, leftover, in_progress], losses, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-30", "checkpoint-35"]
    assert checkpoints_to_delete(steps, {50: 0.1}, keep=1) == steps[:4]  # the best is the newest: nothing extra
    assert checkpoints_to_delete(steps, {}, keep=1) == steps[:4]  # no eval: the newest only
    assert checkpoints_to_delete(steps[:1], {}, keep=1) == []
    assert checkpoints_to_delete([leftover], {}, keep=1) == []


def test_keep_checkpoints_is_bounded():
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        TrainConfig(data="x.jsonl", keep_checkpoints=0).validate()


def test_a_run_keeps_two_checkpoints_plus_the_best_and_resumes(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path, "chat")
    run_dir = tmp_path / "run"
    result = run_training(_config(tiny_model_dir, data), run_dir)
    assert result.status == "succeeded", result.message
    events = read_events(run_dir / "metrics.jsonl")
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [10, 20, 30, 40, 50, 60]
    losses = {e["step"]: e["eval_loss"] for e in events if e["kind"] == "eval" and e["step"] % 10 == 0}
    best = min(losses, key=losses.get)
    left = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert left == sorted({50, 60, best}), (left, losses)
    assert any("deleted checkpoint-" in e.get("message", "") for e in events if e["kind"] == "log")
    # the newest is whole and a run resumes from it; its log history still knows the best of before
    newest = latest_checkpoint(run_dir)
    assert newest.name == "checkpoint-60"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert any(entry.get("step") == best and "eval_loss" in entry for entry in state["log_history"])
    resumed = run_training(_config(tiny_model_dir, data, max_steps=80), tmp_path / "resumed", resume_from=newest)
    assert resumed.status == "succeeded" and resumed.steps == 80, resumed.message
    steps = [e["step"] for e in read_events(tmp_path / "resumed" / "metrics.jsonl") if e["kind"] == "step"]
    assert steps[0] == 61
