"""Runs: creation, the status lifecycle, progress, cancel, edits, listing and deletion with what hangs on a run."""
from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, timezone

import pytest

from storage.repo import InvalidTransition, NotFound, StorageError


def test_create_run_records_a_queued_run(store):
    run = store.create_run({"learning_rate": 2e-4, "target_modules": ("q_proj", "v_proj")}, name="  lora r8 ",
                           model="tiny-llama", adapter="lora", r=8, tags=["pair", "pair", "baseline"],
                           group_name="pair-1", run_dir="/data/runs/x")
    assert len(run.id) == 12 and int(run.id, 16) >= 0
    assert (run.name, run.status, run.step, run.cancel_requested) == ("lora r8", "queued", 0, False)
    assert run.tags == ["pair", "baseline"]
    assert run.config == {"learning_rate": 2e-4, "target_modules": ["q_proj", "v_proj"]}
    assert run.created_at.tzinfo is not None and run.started_at is None and run.finished_at is None
    assert store.get_run(run.id) == run
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.status = "running"
    default_model = store.create_run({}, name="on the default model", model="", adapter="lora", r=8)
    assert default_model.model == ""


def test_lifecycle_stamps_started_and_finished(store, run):
    running = store.set_status(run.id, "running", "loading model", worker="gpu-host:0")
    assert (running.status, running.status_message, running.worker) == ("running", "loading model", "gpu-host:0")
    assert running.started_at >= run.created_at and running.finished_at is None
    again = store.set_status(run.id, "running", "training")
    assert again.started_at == running.started_at and again.status_message == "training"

    done = store.set_status(run.id, "succeeded", "done")
    assert done.finished_at >= done.started_at
    assert done.status == "succeeded" and done.worker == "gpu-host:0"


def test_event_time_can_be_given(store, run):
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    record = store.set_status(run.id, "running", at=started)
    assert record.started_at == started and record.started_at.utcoffset() == timedelta(0)
    with pytest.raises(StorageError, match="at must be a timezone-aware datetime"):
        store.set_status(run.id, "running", at=datetime(2026, 1, 2))


def test_failed_run_keeps_its_error(store, run):
    store.set_status(run.id, "running")
    failed = store.set_status(run.id, "failed", "worker lost", error="Traceback ...")
    assert (failed.status, failed.status_message, failed.error) == ("failed", "worker lost", "Traceback ...")


def test_terminal_status_is_final_unless_forced(store, run):
    store.set_status(run.id, "running")
    cancelled = store.set_status(run.id, "cancelled", "stopped at step 3")
    with pytest.raises(InvalidTransition, match=f"run '{run.id}' is cancelled; refusing to set it running"):
        store.set_status(run.id, "running")
    with pytest.raises(InvalidTransition):
        store.set_status(run.id, "succeeded")
    assert store.set_status(run.id, "cancelled", "replayed") == cancelled  # a replayed event changes nothing

    retried = store.set_status(run.id, "queued", "retry", force=True)
    assert (retried.status, retried.finished_at) == ("queued", None)
    assert store.set_status(run.id, "running").started_at > cancelled.started_at


def test_cancel_request(store, run):
    assert store.request_cancel(run.id).cancel_requested is True
    store.set_status(run.id, "cancelled")
    requeued = store.set_status(run.id, "queued", force=True)
    assert requeued.cancel_requested is False  # a retried run must not stop at once
    store.set_status(run.id, "succeeded")
    assert store.request_cancel(run.id).cancel_requested is False  # nothing left to cancel


def test_update_progress(store, run):
    record = store.update_progress(run.id, step=10, max_steps=100, last_loss=2.5, tokens_per_second=1234.5,
                                   tokens_seen=40960, peak_memory_mb=512.0)
    assert (record.step, record.max_steps, record.last_loss, record.tokens_seen) == (10, 100, 2.5, 40960)
    record = store.update_progress(run.id, step=20, last_loss=None, last_eval_loss=float("nan"))
    assert (record.step, record.last_loss, record.last_eval_loss) == (20, 2.5, None)
    with pytest.raises(StorageError, match="unknown progress field.*learning_rate"):
        store.update_progress(run.id, learning_rate=1e-4)
    with pytest.raises(StorageError, match="step must be an integer >= 0, got -1"):
        store.update_progress(run.id, step=-1)


def test_edits(store, run):
    assert store.rename_run(run.id, "renamed").name == "renamed"
    assert store.set_tags(run.id, ("a", "b", "a")).tags == ["a", "b"]
    assert store.set_tags(run.id, []).tags == []
    store.set_output(run.id, run_dir="/runs/x")
    record = store.set_output(run.id, output_dir="/runs/x/adapter", output_kind="adapter")
    assert (record.run_dir, record.output_dir, record.output_kind) == ("/runs/x", "/runs/x/adapter", "adapter")


def test_list_runs_newest_first_with_filters(store):
    ids = [store.create_run({}, name=f"run {index}", model="m", adapter="mora" if index % 2 else "lora", r=8,
                            group_name="pair" if index < 2 else None).id for index in range(4)]
    assert [run.id for run in store.list_runs()] == ids[::-1]
    assert [run.id for run in store.list_runs(limit=2)] == ids[:1:-1]
    assert [run.id for run in store.list_runs(group_name="pair")] == ids[1::-1]
    store.set_status(ids[0], "running")
    store.set_status(ids[3], "running")
    store.set_status(ids[3], "failed")
    assert [run.id for run in store.list_runs(status="running")] == [ids[0]]
    assert [run.id for run in store.runs_with_status(["queued", "running"])] == ids[:3]


def test_resume_links_to_its_parent(store, run):
    resumed = store.create_run(run.config, name="resume", model=run.model, adapter=run.adapter, r=run.r,
                               parent_id=run.id)
    assert resumed.parent_id == run.id


def test_delete_run_cascades_but_keeps_resumes(store, run):
    resume = store.create_run({}, name="resume", model="m", adapter="mora", r=8, parent_id=run.id)
    other = store.create_run({}, name="other", model="m", adapter="lora", r=8)
    store.add_metric_points(run.id, [{"name": "loss", "step": step, "value": 1.0} for step in range(5)])
    store.add_metric_points(resume.id, [{"name": "loss", "step": 5, "value": 0.5}])
    store.add_log_lines(run.id, [{"seq": 0, "message": "hello"}])
    store.put_artifact(run.id, "adapter", path="/runs/x/adapter")
    chat = store.create_chat(title="ab", base_model="m", adapters=[{"label": "A", "run_id": run.id},
                                                                    {"label": "B", "run_id": other.id}])
    answer = store.add_chat_message(chat.id, turn=1, role="assistant", content="hi", run_id=run.id, label="A")
    store.add_vote(chat.id, turn=1, winner_run_id=run.id, loser_run_id=other.id)

    store.delete_run(run.id)
    with pytest.raises(NotFound):
        store.get_run(run.id)
    assert store.metric_count(run.id) == 0 and store.run_logs(run.id) == [] and store.get_artifacts(run.id) == []
    assert store.get_run(resume.id).parent_id is None
    assert store.metric_count(resume.id) == 1
    assert store.votes_for_run(other.id).losses == 0
    [kept] = store.chat_messages(chat.id)
    assert (kept.id, kept.run_id, kept.content) == (answer.id, None, "hi")


def test_not_found_names_the_id(store):
    with pytest.raises(NotFound, match="run 'feedbeef' not found"):
        store.get_run("feedbeef")
    for call in (lambda: store.set_status("feedbeef", "running"), lambda: store.delete_run("feedbeef"),
                 lambda: store.update_progress("feedbeef", step=1), lambda: store.request_cancel("feedbeef"),
                 lambda: store.add_metric_points("feedbeef", [{"name": "loss", "step": 0, "value": 1.0}]),
                 lambda: store.add_log_lines("feedbeef", []),
                 lambda: store.put_artifact("feedbeef", "adapter", path="/x")):
        with pytest.raises(NotFound, match="'feedbeef'"):
            call()
    with pytest.raises(NotFound, match="dataset 7 not found"):
        store.create_run({}, name="x", model="m", adapter="lora", r=8, dataset_id=7)
    with pytest.raises(NotFound, match="parent run 'nope' not found"):
        store.create_run({}, name="x", model="m", adapter="lora", r=8, parent_id="nope")


BAD_RUN_INPUT = [
    ({"name": "  "}, "name must be a non-empty string"),
    ({"model": None}, "model must be a string (empty for the default model)"),
    ({"r": -1}, "r must be an integer >= 0, got -1"),
    ({"r": 8.0}, "r must be an integer >= 0, got 8.0"),
    ({"tags": "pair"}, "tags must be a list of strings, got the string 'pair'"),
    ({"tags": ["ok", ""]}, "tags must be a non-empty string"),
    ({"config": {"lr": float("nan")}}, "config must be JSON-serialisable"),
    ({"config": {"path": object()}}, "config must be JSON-serialisable"),
    ({"config": [("lr", 1)]}, "config must be a mapping"),
    ({"group_name": ""}, "group_name must be a non-empty string"),
]


def test_bad_run_input_names_the_field(store):
    for change, message in BAD_RUN_INPUT:
        arguments = {"config": {}, "name": "x", "model": "m", "adapter": "lora", "r": 8, **change}
        config = arguments.pop("config")
        with pytest.raises(StorageError, match=f"^{re.escape(message)}"):
            store.create_run(config, **arguments)
    assert store.list_runs() == []


def test_unknown_status_names_the_field(store, run):
    with pytest.raises(StorageError, match="status must be one of queued, running, succeeded, failed, cancelled"):
        store.set_status(run.id, "done")
    with pytest.raises(StorageError, match="status must be one of"):
        store.list_runs(status="done")
    assert issubclass(StorageError, ValueError)
