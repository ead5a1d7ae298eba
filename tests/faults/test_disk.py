"""Disk that does not fill: a run keeps its newest checkpoints and the best by eval loss, still resumes, and the
studio shows what each run and the data folder use."""
import json
from pathlib import Path

import pytest

from app.runs_view import RUN_COLUMNS, runs_table_rows
from app.system_view import FolderSizes, run_disk_use, usage_rows
from tests.app.test_runs_view import make_run
from tests.workers.sample_data import write_dataset
from workers.events import read_events
from workers.train_config import ConfigError, TrainConfig
from workers.training import checkpoints_to_delete, latest_checkpoint, run_training


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


def test_run_sizes_are_measured_at_most_once_a_ttl_and_shown_in_the_runs_table(tmp_path):
    now = [0.0]
    sizes = FolderSizes(ttl_s=30, clock=lambda: now[0])
    running_dir, done_dir = tmp_path / "running", tmp_path / "done"
    for folder in (running_dir / "checkpoints" / "checkpoint-10", done_dir):
        folder.mkdir(parents=True)
    (running_dir / "checkpoints" / "checkpoint-10" / "adapter.safetensors").write_bytes(b"x" * 3000)
    (done_dir / "adapter.safetensors").write_bytes(b"x" * 2048)
    runs = [make_run(id="r1", status="running", run_dir=str(running_dir)),
            make_run(id="r2", status="succeeded", run_dir=str(done_dir)), make_run(id="r3", run_dir=None)]
    assert run_disk_use(runs, sizes) == {"r1": 3000, "r2": 2048}
    (running_dir / "more.bin").write_bytes(b"x" * 1000)
    (done_dir / "late.bin").write_bytes(b"x" * 1000)
    now[0] = 29
    assert run_disk_use(runs, sizes) == {"r1": 3000, "r2": 2048}  # not walked again within the TTL
    now[0] = 31
    assert run_disk_use(runs, sizes) == {"r1": 4000, "r2": 2048}  # a finished run's folder is measured once
    rows = runs_table_rows(runs, disk_use=run_disk_use(runs, sizes))
    assert [row[RUN_COLUMNS.index("disk")] for row in rows] == ["3.9 KiB", "2.0 KiB", ""]


def test_data_folder_usage_lists_each_folder_and_the_total(tmp_path):
    data = tmp_path / "data"
    (data / "runs" / "a").mkdir(parents=True)
    (data / "datasets").mkdir()
    (data / "runs" / "a" / "f.bin").write_bytes(b"x" * 2048)
    (data / "datasets" / "d.jsonl").write_bytes(b"x" * 1024)
    (data / "studio.db").write_bytes(b"x" * 1024)
    rows = usage_rows(data, FolderSizes())
    assert rows == [["datasets", 1, "1.0 KiB"], ["runs", 1, "2.0 KiB"], [f"total ({data})", 3, "4.0 KiB"]]
    assert usage_rows(tmp_path / "missing", FolderSizes()) == []
