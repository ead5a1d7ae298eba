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
