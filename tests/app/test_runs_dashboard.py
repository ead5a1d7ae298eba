"""The Runs tab's tick against a real SQLite store: it reads a bounded page and bounded curves, and sends nothing
for what did not change."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from app import runs_dashboard as dash
from app.service import StudioService
from storage.repo import Store

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture()
def service(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'studio.db'}") as store:
        yield StudioService(store, runs_dir=tmp_path / "runs")


def _make_runs(service, count, steps=0):
    runs = [service.store.create_run({"r": 8, "seed": index}, name=f"run {index:03d}", model="tiny",
                                     adapter=("mora", "lora")[index % 2], r=8) for index in range(count)]
    for run in runs[:10] if steps else []:
        _log(service, run.id, range(steps))
    return runs


def _log(service, run_id, steps):
    steps = list(steps)
    service.store.add_metric_points(run_id, [{"name": "loss", "step": s, "value": 1.0 / (s + 1), "epoch": s / 100,
                                              "tokens": 64 * s} for s in steps])
    service.store.update_progress(run_id, step=steps[-1])


def test_a_quiet_tick_sends_nothing(service):
    runs = _make_runs(service, 60, steps=2000)
    view = dash.CurveView(run_ids=tuple(run.id for run in runs[:10]))
    first = dash.tick(service, None, dash.RunsQuery(), view, now=NOW)
    assert len(first.table) == dash.PAGE_SIZE  # one page of 60, not the history
    assert first.page_note == "Runs 1–25 of 60 · page 1 of 3"
    traces = [trace for trace in first.figure.data if trace.name.endswith(" train")]
    assert len(traces) == 10 and all(len(trace.x) <= dash.buckets_per_run(10) == 200 for trace in traces)
    again = dash.tick(service, first.state, dash.RunsQuery(), view, now=NOW)
    assert all(part is dash.UNCHANGED for part in (again.table, again.choices, again.page_note, again.figure,
                                                   again.diff, again.metrics, again.ranks))


def test_new_points_redraw_only_the_figure_and_read_only_the_run_that_moved(service, monkeypatch):
    runs = _make_runs(service, 3, steps=50)
    view = dash.CurveView(run_ids=(runs[0].id, runs[1].id))
    state = dash.tick(service, None, dash.RunsQuery(), view, now=NOW).state
    read = []
    original = service.sampled_curves
    monkeypatch.setattr(service, "sampled_curves", lambda ids, *a, **k: read.append(list(ids)) or original(ids, *a, **k))
    _log(service, runs[1].id, range(50, 60))
    after = dash.tick(service, state, dash.RunsQuery(), view, now=NOW)
    assert read == [[runs[1].id]]
    assert after.figure is not dash.UNCHANGED and after.diff is dash.UNCHANGED
    [moved] = [t for t in after.figure.data if t.name == "run 001 train"]
    assert max(moved.x) == 59
    assert after.table is not dash.UNCHANGED  # its progress column moved too
    smoothed = dash.tick(service, after.state, dash.RunsQuery(), dash.CurveView(view.run_ids, smoothing=0.5), now=NOW)
    assert read == [[runs[1].id]] and smoothed.figure is not dash.UNCHANGED  # a display change reads nothing


def test_filters_and_pages_go_to_the_query(service):
    runs = _make_runs(service, 40)
    lora = dash.tick(service, None, dash.RunsQuery(adapter="lora", sort="name"), dash.CurveView(), now=NOW)
    assert [row[1] for row in lora.table][:3] == ["run 001", "run 003", "run 005"]
    assert lora.page_note == "Runs 1–20 of 20 · page 1 of 1"
    second = dash.tick(service, None, dash.RunsQuery(page=1), dash.CurveView(), now=NOW)
    assert len(second.table) == 15 and second.page_note == "Runs 26–40 of 40 · page 2 of 2"
    found = dash.tick(service, None, dash.RunsQuery(search="RUN 03"), dash.CurveView(), now=NOW)
    assert sorted(row[1] for row in found.table) == [f"run {i:03d}" for i in range(30, 40)]
    # a selected run from another page stays among the choices, so paging keeps the selection
    kept = dash.tick(service, None, dash.RunsQuery(page=1), dash.CurveView(run_ids=(runs[-1].id,)), now=NOW)
    assert kept.choices[-1] == (f"run 039 · {runs[-1].id}", runs[-1].id)


def test_zoom_reads_its_steps_at_full_resolution(service):
    [run] = _make_runs(service, 1)
    _log(service, run.id, range(10_000))
    whole = dash.tick(service, None, dash.RunsQuery(), dash.CurveView(run_ids=(run.id,)), now=NOW)
    line = [t for t in whole.figure.data if t.name == "run 000 train"][0]
    assert len(line.x) == dash.MAX_BUCKETS_PER_RUN
    zoomed = dash.tick(service, whole.state, dash.RunsQuery(),
                       dash.CurveView(run_ids=(run.id,), step_range=(2000, 2999)), now=NOW)
    line = [t for t in zoomed.figure.data if t.name == "run 000 train"][0]
    assert list(line.x) == list(range(2000, 3000))


def test_inputs_are_bounded(service):
    runs = _make_runs(service, 12)
    with pytest.raises(ValueError, match="compare at most 10 runs"):
        dash.tick(service, None, dash.RunsQuery(), dash.CurveView(run_ids=tuple(r.id for r in runs)), now=NOW)
    with pytest.raises(ValueError, match="sort: expected one of"):
        dash.tick(service, None, dash.RunsQuery(sort="config"), dash.CurveView(), now=NOW)
    with pytest.raises(ValueError, match="at most 200 characters"):
        dash.tick(service, None, dash.RunsQuery(search="x" * 201), dash.CurveView(), now=NOW)


def test_zoom_boxes_become_a_step_range():
    assert dash.zoom_range(None, None) is None and dash.zoom_range("", "") is None
    assert dash.zoom_range(0, 0) is None  # what cleared number boxes send
    assert dash.zoom_range(100, 200) == (100, 200)
    assert dash.zoom_range(100, None) == (100, 2**31 - 1) and dash.zoom_range(None, 50) == (0, 50)
    with pytest.raises(ValueError, match="must be at least 0 and at most 'to step'"):
        dash.zoom_range(300, 200)
    with pytest.raises(ValueError, match="whole numbers"):
        dash.zoom_range("a", 3)


def test_a_live_run_reads_only_its_new_steps_and_stays_bounded(service, monkeypatch):
    [run] = _make_runs(service, 1)
    service.store.set_status(run.id, "running")
    _log(service, run.id, range(10_000))
    view = dash.CurveView(run_ids=(run.id,))
    state = dash.tick(service, None, dash.RunsQuery(), view, now=NOW).state
    ranges = []
    original = service.sampled_curves
    monkeypatch.setattr(service, "sampled_curves",
                        lambda ids, *a, **k: ranges.append(k.get("step_range")) or original(ids, *a, **k))
    for start in range(10_000, 15_000, 500):
        service.store.add_metric_points(run.id, [{"name": "loss", "step": s, "value": 99.0 if s == 12_345 else 0.1}
                                                 for s in range(start, start + 500)])
        service.store.update_progress(run.id, step=start + 499)
        state = dash.tick(service, state, dash.RunsQuery(), view, now=NOW).state
    assert ranges[0] == (10_000, 2**31 - 1) and ranges[-1] == (14_500, 2**31 - 1)  # only what is new
    curve = state.curves[run.id]["loss"]
    assert len(curve) <= dash.MAX_BUCKETS_PER_RUN
    assert sum(bucket.count for bucket in curve) == 15_000
    assert max(bucket.high for bucket in curve) == 99.0 and curve[-1].step == 14_999
    service.store.set_status(run.id, "succeeded")  # a run that ends is drawn once more as the store samples it
    ended = dash.tick(service, state, dash.RunsQuery(), view, now=NOW)
    assert ranges[-1] is None and ended.figure is not dash.UNCHANGED
