"""Sampled curves: at most N points a series, chosen in the query, with each bucket's min, max and last point."""
from __future__ import annotations

import pytest

from storage.repo import StorageError


def _points(steps, value=lambda step: float(step), name="loss"):
    return [{"name": name, "step": step, "value": value(step), "epoch": step / 10, "tokens": 100 * step,
             "time": 1_700_000_000.0 + step} for step in steps]


def test_buckets_are_cut_at_hand_checked_steps(store, run):
    # steps 0..9 in 3 buckets: bucket = step * 3 // 10 → {0..3}, {4..6}, {7..9}
    store.add_metric_points(run.id, _points(range(10)))
    sampled = store.sampled_series([run.id], ["loss"], buckets=3)[run.id]["loss"]
    assert [(p.step, p.value, p.low, p.high, p.count) for p in sampled] == [
        (3, 3.0, 0.0, 3.0, 4), (6, 6.0, 4.0, 6.0, 3), (9, 9.0, 7.0, 9.0, 3)]
    assert [(p.epoch, p.tokens, p.time) for p in sampled] == [
        (0.3, 300, 1_700_000_003.0), (0.6, 600, 1_700_000_006.0), (0.9, 900, 1_700_000_009.0)]


def test_a_short_series_comes_back_whole(store, run):
    store.add_metric_points(run.id, _points([1, 5, 7]))
    sampled = store.sampled_series([run.id], ["loss"], buckets=3)[run.id]["loss"]
    assert [(p.step, p.value, p.low, p.high, p.count) for p in sampled] == [
        (1, 1.0, 1.0, 1.0, 1), (5, 5.0, 5.0, 5.0, 1), (7, 7.0, 7.0, 7.0, 1)]


def test_a_spike_survives_sampling(store, run):
    spike = 5123
    store.add_metric_points(run.id, _points(range(10_000), lambda s: 100.0 if s == spike else 1.0 / (s + 1)))
    sampled = store.sampled_series([run.id], ["loss"], buckets=100)[run.id]["loss"]
    assert len(sampled) == 100
    assert sum(p.count for p in sampled) == 10_000
    [holder] = [p for p in sampled if p.high == 100.0]
    assert holder.step - holder.count < spike <= holder.step  # the bucket that holds the spike shows it
    assert holder.value == 1.0 / (holder.step + 1)  # the line still follows the last point
    assert sampled[-1].step == 9999 and sampled[-1].value == 1.0 / 10_000
    assert [p.step for p in sampled] == sorted(p.step for p in sampled)


def test_zoom_reads_its_range_at_full_resolution(store, run):
    store.add_metric_points(run.id, _points(range(10_000)))
    zoomed = store.sampled_series([run.id], ["loss"], buckets=1500, step_range=(4000, 4999))[run.id]["loss"]
    assert [p.step for p in zoomed] == list(range(4000, 5000))
    assert all(p.count == 1 for p in zoomed)
    coarse = store.sampled_series([run.id], ["loss"], buckets=10, step_range=(4000, 4999))[run.id]["loss"]
    assert [p.step for p in coarse] == list(range(4099, 5000, 100))


def test_gaps_and_several_runs_in_one_query(store, run):
    other = store.create_run({}, name="lora r8", model="tiny-llama", adapter="lora", r=8)
    store.add_metric_points(run.id, _points(range(4), lambda s: None if s == 1 else float(s)))
    store.add_metric_points(run.id, _points([2], name="eval_loss"))
    store.add_metric_points(other.id, _points(range(6)))
    series = store.sampled_series([run.id, other.id, "gone"], ["loss", "eval_loss"], buckets=2)
    assert [(p.step, p.value, p.low, p.high) for p in series[run.id]["loss"]] == [
        (1, None, 0.0, 0.0), (3, 3.0, 2.0, 3.0)]
    assert [p.step for p in series[run.id]["eval_loss"]] == [2]
    assert [(p.step, p.low, p.high) for p in series[other.id]["loss"]] == [(2, 0.0, 2.0), (5, 3.0, 5.0)]
    assert series[other.id]["eval_loss"] == [] and series["gone"] == {"loss": [], "eval_loss": []}
    assert set(store.sampled_series([run.id])[run.id]) == {"loss", "eval_loss"}


def test_long_runs_do_not_overflow(store, run):
    # (step - lo) × buckets passes 2^31 here: the arithmetic must be 64-bit on PostgreSQL too
    store.add_metric_points(run.id, _points([0, 1, 1_500_000_000, 2_000_000_000]))
    sampled = store.sampled_series([run.id], ["loss"], buckets=2)[run.id]["loss"]
    assert [(p.step, p.count) for p in sampled] == [(1, 2), (2_000_000_000, 2)]
    assert sampled[1].low == 1_500_000_000.0


def test_latest_point_ids_grow_only_with_new_points(store, run):
    other = store.create_run({}, name="lora r8", model="tiny-llama", adapter="lora", r=8)
    assert store.latest_point_ids([run.id, other.id]) == {run.id: 0, other.id: 0}
    store.add_metric_points(run.id, _points(range(3)))
    first = store.latest_point_ids([run.id, other.id])
    assert first[run.id] > 0 and first[other.id] == 0
    store.add_metric_points(run.id, _points(range(3)))  # a replay stores nothing new
    assert store.latest_point_ids([run.id, other.id]) == first
    store.add_metric_points(run.id, _points([3]))
    assert store.latest_point_ids([run.id])[run.id] > first[run.id]


@pytest.mark.parametrize("buckets", [0, -1, 20_001, 1.5, True])
def test_bucket_count_is_bounded(store, run, buckets):
    with pytest.raises(ValueError, match="buckets must be a whole number from 1 to 20000"):
        store.sampled_series([run.id], ["loss"], buckets=buckets)


def test_step_range_is_checked(store, run):
    with pytest.raises(StorageError, match="step_range"):
        store.sampled_series([run.id], ["loss"], step_range=("a", 3))
