"""The one small interface between a training run and whoever listens: an event sink.

A run emits plain JSON-able dicts (status, step metrics, eval loss, log lines, checkpoints, the final adapter) and
never depends on a listener: the JSONL file in the run folder is always written; a Redis stream sink joins it when
the run comes through the queue. Each event carries the run id and a sequence number, so a collector that replays a
stream can store every point exactly once.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

from storage.statuses import STATUSES

EVENT_KINDS = ("status", "step", "eval", "log", "checkpoint", "adapter", "data")


class EventSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...


class JsonlSink:
    """Appends one JSON line per event and flushes it, so a crash loses nothing already emitted."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)


class CallbackSink:
    """Calls a function per event: the command line's progress bar listens this way."""

    def __init__(self, callback) -> None:
        self.callback = callback

    def emit(self, event: dict[str, Any]) -> None:
        self.callback(event)


class EventPublisher:
    """Stamps each event with run id, kind, sequence number and time, then fans it out to every sink.

    A failing listener is reported once on the others and never stops the run.
    """

    def __init__(self, run_id: str, sinks: Iterable[EventSink], first_seq: int = 0) -> None:
        self.run_id = run_id
        self.sinks = list(sinks)
        self._seq = first_seq
        self._lock = threading.Lock()
        self._broken: set[int] = set()

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._lock:
            event = {"run_id": self.run_id, "seq": self._seq, "time": time.time(), "kind": kind, **fields}
            self._seq += 1
        for index, sink in enumerate(self.sinks):
            try:
                sink.emit(event)
            except Exception as error:  # a listener's failure must not end the run
                if index not in self._broken:
                    self._broken.add(index)
                    self._report_broken(index, error)
        return event

    def _report_broken(self, broken: int, error: Exception) -> None:
        note = {"run_id": self.run_id, "seq": -1, "time": time.time(), "kind": "log", "level": "warning",
                "message": f"event sink {type(self.sinks[broken]).__name__} failed: {error}"}
        for index, sink in enumerate(self.sinks):
            if index not in self._broken:
                try:
                    sink.emit(note)
                except Exception:
                    self._broken.add(index)

    def status(self, status: str, message: str = "", **extra: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.emit("status", status=status, message=message, **extra)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a run folder's metrics.jsonl, skipping a torn last line from a crash."""
    events = []
    if not Path(path).exists():
        return events
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
