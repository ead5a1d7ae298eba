"""Metric points and log lines: idempotent writes (the collector replays streams), curve reads, concurrent writers."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from storage.records import MetricPointRecord
from storage.repo import NotFound, StorageError, Store


def _points(steps, name="loss"):
    return [{"name": name, "step": step, "value": 1.0 / (step + 1), "epoch": step / 100, "tokens": 512 * step,
             "time": 1_700_000_000.0 + step} for step in steps]


def test_metric_points_are_idempotent(store, run):
    points = _points(range(1000))
    assert store.add_metric_points(run.id, points) == 1000
    assert store.add_metric_points(run.id, points) == 0
    assert store.metric_count(run.id) == 1000
    assert store.add_metric_points(run.id, _points(range(990, 1010))) == 10
    assert store.add_metric_points(run.id, _points([2000, 2000, 2001])) == 2  # a batch may repeat an event
    assert store.metric_count(run.id) == 1012
    assert store.metric_count(run.id, "loss") == 1012 and store.metric_count(run.id, "eval_loss") == 0
    assert store.add_metric_points(run.id, []) == 0


def test_first_stored_value_wins(store, run):
    store.add_metric_points(run.id, [{"name": "loss", "step": 1, "value": 2.0}])
    store.add_metric_points(run.id, [{"name": "loss", "step": 1, "value": 9.0}])
    [point] = store.metric_series([run.id], ["loss"])[run.id]["loss"]
    assert point == MetricPointRecord(run_id=run.id, name="loss", step=1, value=2.0, epoch=None, tokens=None,
                                      time=None)


def test_metric_series_shape_and_order(store, run):
    other = store.create_run({}, name="lora r8", model="tiny-llama", adapter="lora", r=8)
    store.add_metric_points(run.id, _points([30, 10, 20]) + _points([20, 10], "eval_loss")
                            + _points([10], "learning_rate"))
    store.add_metric_points(other.id, _points([5, 1]))

    series = store.metric_series([run.id, other.id, "gone"], ["loss", "eval_loss"])
    assert list(series) == [run.id, other.id, "gone"]
    assert {name: [point.step for point in points] for name, points in series[run.id].items()} == {
        "loss": [10, 20, 30], "eval_loss": [10, 20]}
    assert {name: [point.step for point in points] for name, points in series[other.id].items()} == {
        "loss": [1, 5], "eval_loss": []}
    assert series["gone"] == {"loss": [], "eval_loss": []}
    first = series[run.id]["loss"][0]
    assert (first.run_id, first.value, first.epoch, first.tokens, first.time) == (
        run.id, 1 / 11, 0.1, 5120, 1_700_000_010.0)

    assert set(store.metric_series([run.id])[run.id]) == {"loss", "eval_loss", "learning_rate"}
    assert store.metric_series([]) == {}


def test_non_finite_values_are_gaps(store, run):
    store.add_metric_points(run.id, [{"name": "loss", "step": 0, "value": float("nan")},
                                     {"name": "loss", "step": 1, "value": float("inf")},
                                     {"name": "grad_norm", "step": 1, "value": None}])
    series = store.metric_series([run.id])[run.id]
    assert [point.value for point in series["loss"]] == [None, None]
    assert series["grad_norm"][0].value is None


@pytest.mark.parametrize(("point", "message"), [
    ({"name": "loss", "step": -1, "value": 1.0}, r"points\[1\]\.step must be an integer >= 0, got -1"),
    ({"name": "", "step": 1, "value": 1.0}, r"points\[1\]\.name must be a non-empty string"),
    ({"name": "loss", "step": 1, "value": "low"}, r"points\[1\]\.value must be a number, got 'low'"),
    ({"name": "loss", "step": 1.5, "value": 1.0}, r"points\[1\]\.step must be an integer"),
    ({"step": 1, "value": 1.0}, r"points\[1\]\.name must be a non-empty string, got None"),
    (("loss", 1, 1.0), r"points\[1\] must be a mapping"),
], ids=["negative step", "empty name", "text value", "float step", "no name", "tuple"])
def test_bad_points_are_refused_whole(store, run, point, message):
    with pytest.raises(StorageError, match=message):
        store.add_metric_points(run.id, [{"name": "loss", "step": 0, "value": 1.0}, point])
    assert store.metric_count(run.id) == 0


def test_log_lines_are_idempotent_and_paged(store, run):
    lines = [{"seq": seq, "time": 1_700_000_000.0 + seq, "level": "warning" if seq == 3 else "info",
              "message": f"line {seq}"} for seq in range(10)]
    assert store.add_log_lines(run.id, lines) == 10
    assert store.add_log_lines(run.id, lines[5:] + [{"seq": 10, "message": "last"}]) == 1
    logs = store.run_logs(run.id)
    assert [line.seq for line in logs] == list(range(11))
    assert (logs[3].level, logs[3].message, logs[10].level) == ("warning", "line 3", "info")
    assert [line.seq for line in store.run_logs(run.id, after_seq=7)] == [8, 9, 10]
    assert [line.seq for line in store.run_logs(run.id, after_seq=2, limit=3)] == [3, 4, 5]
    with pytest.raises(StorageError, match=r"lines\[0\]\.seq must be an integer >= 0"):
        store.add_log_lines(run.id, [{"seq": -1, "message": "x"}])
    with pytest.raises(StorageError, match=r"lines\[0\]\.message must be a string"):
        store.add_log_lines(run.id, [{"seq": 11}])


def test_two_threads_write_one_run_without_loss(backend, store, run):
    """Two stores (two pools) write overlapping points in many small transactions; every point lands once."""
    url = store.url if backend == "sqlite" else None
    stores = [Store(url) if url else store, Store(url) if url else store]
    inserted = [0, 0]
    errors = []

    def write(index, steps):
        try:
            for start in range(0, len(steps), 20):
                inserted[index] += stores[index].add_metric_points(run.id, _points(steps[start:start + 20]))
                stores[index].update_progress(run.id, step=steps[start])
        except Exception as error:  # reported below, with the thread's error
            errors.append(error)

    threads = [threading.Thread(target=write, args=(0, list(range(0, 600))), daemon=True),
               threading.Thread(target=write, args=(1, list(range(300, 900))), daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a writer is stuck"
    if url:
        for opened in stores:
            opened.close()
    assert errors == []
    assert sum(inserted) == 900
    assert store.metric_count(run.id) == 900
    assert [point.step for point in store.metric_series([run.id], ["loss"])[run.id]["loss"]] == list(range(900))


WRITER = """
import sys
from storage.repo import Store
with Store(sys.argv[1]) as store:
    print("ready", flush=True)
    for seq in range(int(sys.argv[3])):
        store.add_log_lines(sys.argv[2], [{"seq": seq, "message": f"from the other process {seq}"}])
"""


def test_two_processes_share_one_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    with Store(url) as store:
        run = store.create_run({}, name="shared", model="m", adapter="mora", r=8)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, url, run.id, "100"], stdout=subprocess.PIPE,
                                  text=True)
        assert writer.stdout.readline() == "ready\n"  # both write from here on
        written, deadline = 0, time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:
            written += store.add_metric_points(run.id, _points([written]))
            time.sleep(0.002)  # a collector's pace; a tight loop would mostly measure SQLite's lock backoff
        assert writer.wait(timeout=30) == 0
        assert written > 0 and store.metric_count(run.id) == written
        assert len(store.run_logs(run.id)) == 100


def test_writes_to_a_missing_run(store):
    with pytest.raises(NotFound, match="run 'nope' not found"):
        store.add_log_lines("nope", [{"seq": 0, "message": "x"}])
    assert store.metric_series(["nope"], ["loss"]) == {"nope": {"loss": []}}
    assert store.run_logs("nope") == [] and store.metric_count("nope") == 0
