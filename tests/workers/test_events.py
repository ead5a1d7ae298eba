import json

import pytest

from workers.events import CallbackSink, EventPublisher, JsonlSink, read_events


class BrokenSink:
    def emit(self, event):
        raise ConnectionError("redis is down")


def test_publisher_stamps_sequence_and_fans_out(tmp_path):
    seen = []
    publisher = EventPublisher("run-1", [JsonlSink(tmp_path / "m.jsonl"), CallbackSink(seen.append)])
    publisher.status("running")
    publisher.emit("step", step=1, loss=2.5)
    publisher.log("hello")
    events = read_events(tmp_path / "m.jsonl")
    assert events == seen
    assert [e["seq"] for e in events] == [0, 1, 2]
    assert [e["kind"] for e in events] == ["status", "step", "log"]
    assert events[1]["loss"] == 2.5 and events[0]["run_id"] == "run-1"
    with pytest.raises(ValueError, match="unknown event kind"):
        publisher.emit("nonsense")
    with pytest.raises(ValueError, match="unknown status"):
        publisher.status("exploded")


def test_a_broken_listener_never_stops_the_run(tmp_path):
    publisher = EventPublisher("r", [BrokenSink(), JsonlSink(tmp_path / "m.jsonl")])
    for step in range(3):
        publisher.emit("step", step=step, loss=1.0)
    events = read_events(tmp_path / "m.jsonl")
    warnings = [e for e in events if e["kind"] == "log"]
    assert len(warnings) == 1 and "redis is down" in warnings[0]["message"]
    assert [e["step"] for e in events if e["kind"] == "step"] == [0, 1, 2]


def test_read_events_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"seq": 0, "kind": "log"}) + "\n" + '{"seq": 1, "ki')
    assert read_events(path) == [{"seq": 0, "kind": "log"}]
    assert read_events(tmp_path / "absent.jsonl") == []


def test_the_collector_stamps_a_run_with_its_events_times_not_when_it_reads_them(tmp_path):
    """A local benchmark run is stored after it ends, and a restarted collector catches up late: the run's start and
    end must still be when they happened."""
    from datetime import datetime, timezone

    from storage.repo import Store
    from workers.collector import Collector

    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    run = store.create_run({"adapter": "lora"}, name="late", model="tiny", adapter="lora", r=8, variant=None)
    started, finished = 1_795_000_000.25, 1_795_000_321.5
    Collector(store, None).apply([
        {"run_id": run.id, "seq": 0, "time": started, "kind": "status", "status": "running", "message": ""},
        {"run_id": run.id, "seq": 1, "time": finished, "kind": "status", "status": "succeeded", "message": ""},
    ])
    stored = store.get_run(run.id)
    assert stored.status == "succeeded"
    assert stored.started_at.replace(tzinfo=stored.started_at.tzinfo or timezone.utc).timestamp() == started
    assert stored.finished_at.replace(tzinfo=stored.finished_at.tzinfo or timezone.utc).timestamp() == finished
    assert (stored.finished_at - stored.started_at).total_seconds() == finished - started
    assert datetime.now(timezone.utc).timestamp() - finished > 60
    store.close()
