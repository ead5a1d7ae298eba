"""The event collector: runs in the web process, reads every run's Redis stream and writes what it says into the
run store, and marks runs whose worker vanished.

Idempotent by construction: metric points are unique per (run, name, step) and log lines per (run, seq), so a replayed
stream (after a Redis restart, or a web process that restarts from an older position) adds nothing twice. Its read
positions live in the store, so a restarted web process catches up with what it missed.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Iterable

import redis

from storage.repo import TERMINAL_STATUSES, InvalidTransition, NotFound, Store
from workers import bus
from workers.eval_metrics import METRICS, curve_name
from workers.settings import worker_lost_after_s

log = logging.getLogger(__name__)


STEP_METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb")
# eval_loss from the eval split; char_accuracy and exact_match from a memorisation probe (workers.memorize); gen_*
# from the generation eval during training (eval_generate_steps, workers.evaluation)
EVAL_METRICS = ("eval_loss", "char_accuracy", "exact_match", *(curve_name(metric) for metric in METRICS))


class Collector:
    def __init__(self, store: Store, redis_url: str | None, block_ms: int = 200, lost_after_s: float | None = None,
                 lost_check_every_s: float = 5.0) -> None:
        """`redis_url` None: no bus, and only `apply` works; `mora-studio bench memorize --local` stores the events of
        run folders this way."""
        self.store = store
        self.client = bus.connect(redis_url) if redis_url else None
        self.block_ms = block_ms
        # the heartbeat key outlives the last beat by MORA_HEARTBEAT_TTL_S (15 s), so a dead worker's run is marked
        # about 15 + 15 s (+ one check) after it died; a live worker recreates its key within a beat of a Redis restart
        self.lost_after_s = worker_lost_after_s() if lost_after_s is None else lost_after_s
        self.lost_check_every_s = lost_check_every_s
        self._missing_since: dict[str, float] = {}
        self._positions: dict[str, str] = {}
        self._last_lost_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> "Collector":
        self._thread = threading.Thread(target=self.run_forever, daemon=True, name="event-collector")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
                if time.monotonic() - self._last_lost_check >= self.lost_check_every_s:
                    self.mark_lost_runs()
            except redis.RedisError as error:  # Redis restarting: wait and reconnect, positions are stored
                log.warning("collector: Redis unavailable (%s); retrying", error)
                self._stop.wait(0.5)
            except Exception:  # never let one bad event stop collection for every run
                log.exception("collector: unexpected error")
                self._stop.wait(0.5)

    # -- reading --------------------------------------------------------------------------------------------------

    def poll_once(self, block_ms: int | None = None) -> int:
        """Read what is new on every run stream (waiting up to block_ms) and store it; return the events handled."""
        streams = sorted(self.client.smembers(bus.STREAMS_SET))
        if not streams:
            self._stop.wait((block_ms if block_ms is not None else self.block_ms) / 1000)
            return 0
        positions = {stream: self._position(stream) for stream in streams}
        replies = self.client.xread(positions, count=1000, block=block_ms if block_ms is not None else self.block_ms)
        handled = 0
        for stream, entries in replies or []:
            events = [json.loads(fields["event"]) for _, fields in entries]
            self.apply(events)
            self.store.set_stream_position(stream, entries[-1][0])
            self._positions[stream] = entries[-1][0]
            handled += len(events)
            if any(event["kind"] in ("status", "eval_status") and event.get("status") in TERMINAL_STATUSES
                   for event in events):
                self._retire(stream)
        return handled

    def _position(self, stream: str) -> str:
        """Where this stream was read up to: from memory, and from the store only the first time (a restarted web
        process catches up from there), so a poll costs no store query per stream."""
        if stream not in self._positions:
            self._positions[stream] = self.store.get_stream_position(stream) or "0-0"
        return self._positions[stream]

    def _retire(self, stream: str) -> None:
        """A finished run's stream leaves the poll set and expires: the store holds all of it, and a poll's cost
        follows the live runs rather than every run ever made. (A late publish, such as a worker's replay after a
        Redis restart, puts it back in the set.)"""
        pipe = self.client.pipeline(transaction=False)
        pipe.srem(bus.STREAMS_SET, stream)
        pipe.expire(stream, bus.FINISHED_STREAM_TTL_S)
        pipe.execute()
        self._positions.pop(stream, None)

    # -- writing --------------------------------------------------------------------------------------------------

    def apply(self, events: Iterable[dict[str, Any]]) -> None:
        """Store a batch of events (any runs, any order within a run is tolerated)."""
        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        by_evaluation: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in events:
            if "eval_id" in event:
                by_evaluation[event["eval_id"]].append(event)
            else:
                by_run[event["run_id"]].append(event)
        for run_id, run_events in by_run.items():
            try:
                self._apply_run(run_id, sorted(run_events, key=lambda e: e["seq"]))
            except NotFound:
                log.info("collector: events for unknown run %s ignored", run_id)
        for eval_id, eval_events in by_evaluation.items():
            try:
                self._apply_evaluation(eval_id, sorted(eval_events, key=lambda e: e["seq"]))
            except NotFound:
                log.info("collector: events for unknown evaluation %s ignored", eval_id)

    def _apply_evaluation(self, eval_id: str, events: list[dict[str, Any]]) -> None:
        """An evaluation's events (`workers.evaluation`) into the store; every write is idempotent."""
        for event in events:
            kind = event["kind"]
            if kind == "eval_status":
                at = datetime.fromtimestamp(event["time"], timezone.utc) if event.get("time") is not None else None
                try:
                    self.store.set_evaluation_status(eval_id, event["status"], event.get("message", ""),
                                                     worker=event.get("worker") or None,
                                                     examples_total=event.get("examples_total"), at=at)
                except InvalidTransition:
                    pass  # a replayed or late event cannot move a finished evaluation
            elif kind == "eval_examples":
                self.store.add_evaluation_examples(eval_id, event["examples"])
            elif kind == "eval_answers":
                self.store.add_evaluation_answers(eval_id, event["answers"], examples_done=event.get("examples_done"))
            elif kind == "eval_scores":
                self.store.put_evaluation_scores(eval_id, event["scores"])
            elif kind == "eval_judged":
                self.store.judge_evaluation(eval_id, answers=event.get("answers", []),
                                            examples=event.get("examples", []))

    def _apply_run(self, run_id: str, events: list[dict[str, Any]]) -> None:
        points, lines, progress = [], [], {}
        for event in events:
            kind = event["kind"]
            if kind == "step":
                points += [_point(event, name) for name in STEP_METRICS if event.get(name) is not None]
                progress.update(step=event["step"], max_steps=event.get("max_steps"), last_loss=event["loss"],
                                tokens_per_second=event.get("tokens_per_second"),
                                tokens_seen=event.get("tokens_seen"), peak_memory_mb=event.get("peak_memory_mb"))
            elif kind == "eval":
                points += [_point(event, name) for name in EVAL_METRICS if event.get(name) is not None]
                if event.get("eval_loss") is not None:
                    progress["last_eval_loss"] = event["eval_loss"]
            elif kind in ("log", "checkpoint", "data") and event["seq"] >= 0:
                lines.append({"seq": event["seq"], "time": event["time"], "level": event.get("level", "info"),
                              "message": _describe(event)})
            elif kind == "adapter":
                self.store.put_artifact(run_id, event["output_kind"], path=event["path"],
                                        size_bytes=event["size_bytes"],
                                        trainable_parameters=event["trainable_parameters"],
                                        r_hat=event.get("r_hat"), effective_rank=event.get("effective_rank"),
                                        layers=event.get("layers"))
                self.store.set_output(run_id, output_dir=event["path"], output_kind=event["output_kind"])
            elif kind == "status":
                self._apply_status(run_id, event)
        if points:
            self.store.add_metric_points(run_id, points)
        if lines:
            self.store.add_log_lines(run_id, lines)
        if progress:
            self.store.update_progress(run_id, **{k: v for k, v in progress.items() if v is not None})

    def _apply_status(self, run_id: str, event: dict[str, Any]) -> None:
        status = event["status"]
        # The event's own time, not now: a collector catching up after a restart, or a local run stored after it
        # ended, must not squash a run's duration to the moment it was read.
        at = datetime.fromtimestamp(event["time"], timezone.utc) if event.get("time") is not None else None
        try:
            self.store.set_status(run_id, status, message=event.get("message", ""), worker=event.get("worker") or None,
                                  error=event.get("message") if status == "failed" else None, at=at)
        except InvalidTransition:
            pass  # a replayed or late event cannot move a finished run

    # -- lost workers ---------------------------------------------------------------------------------------------

    def mark_lost_runs(self) -> list[str]:
        """Fail running runs whose heartbeat has been missing for `lost_after_s` (survives a Redis restart: the
        worker's heartbeat thread recreates its key within seconds)."""
        self._last_lost_check = time.monotonic()
        now, lost = time.monotonic(), []
        running = {run.id for run in self.store.runs_with_status(["running"])}
        for run_id in list(self._missing_since):
            if run_id not in running:
                del self._missing_since[run_id]
        for run_id in running:
            if bus.heartbeat_alive(self.client, run_id):
                self._missing_since.pop(run_id, None)
                continue
            since = self._missing_since.setdefault(run_id, now)
            if now - since >= self.lost_after_s:
                self.store.set_status(run_id, "failed", message="worker lost", error="worker lost")
                bus.set_state(self.client, run_id, "failed")
                self._retire(bus.stream_key(run_id))
                del self._missing_since[run_id]
                lost.append(run_id)
        return lost


def _point(event: dict[str, Any], name: str) -> dict[str, Any]:
    return {"name": name, "step": event["step"], "value": event.get(name), "epoch": event.get("epoch"),
            "tokens": event.get("tokens_seen"), "time": event["time"]}


def _describe(event: dict[str, Any]) -> str:
    if event["kind"] == "checkpoint":
        return f"checkpoint at step {event['step']}: {event['path']}"
    if event["kind"] == "data":
        report = event.get("report") or {}
        return (f"data: {event.get('rows')} rows ({event.get('schema')}) -> {event.get('train_examples')} train / "
                f"{event.get('eval_examples')} eval examples; {len(report.get('dropped', []))} dropped, "
                f"{len(report.get('truncated', []))} truncated")
    return event.get("message", "")
