"""Everything the studio keeps in Redis besides the Celery queues: run event streams, cancel flags, heartbeats,
run states and the worker roster. One module names every key, so the worker, the collector and the web app agree.

Event streams are per run and bounded. A Redis restart loses them (the embedded Redis keeps nothing on disk), so
the stream sink remembers what it sent and re-sends all of it when it finds Redis emptied; the collector stores
events idempotently, so a replay adds nothing twice.
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time
from typing import Any, Optional

import redis

from workers.celery_app import QUEUES
from workers.settings import heartbeat_every_s, heartbeat_ttl_s

STREAM_MAXLEN = 100_000
STATE_TTL_S = 30 * 24 * 3600
FINISHED_STREAM_TTL_S = 24 * 3600  # a finished run's stream, kept a day for a late reader, then gone
WORKER_TTL_S = 30
CHAT_STREAM_MAXLEN = 1_000  # each entry is a whole snapshot, so a reader that falls behind loses nothing by trimming
CHAT_TTL_S = 3600
REPLY_TTL_S = 60

STREAMS_SET = "mora:streams"
WORKERS_SET = "mora:workers"
SERVE_PENDING = "mora:serve:pending"
"""The API's requests waiting for a chat worker (JSON, oldest first); a worker takes all that arrived together."""


def stream_key(run_id: str) -> str:
    return f"mora:run:{run_id}:events"


def cancel_key(run_id: str) -> str:
    return f"mora:run:{run_id}:cancel"


def heartbeat_key(run_id: str) -> str:
    return f"mora:run:{run_id}:heartbeat"


def state_key(run_id: str) -> str:
    return f"mora:run:{run_id}:state"


def marker_key(run_id: str) -> str:
    return f"mora:run:{run_id}:marker"


def eval_stream_key(eval_id: str) -> str:
    """An evaluation's events (`workers.evaluation`), read by the collector like a run's stream."""
    return f"mora:eval:{eval_id}:events"


def eval_cancel_key(eval_id: str) -> str:
    return f"mora:eval:{eval_id}:cancel"


def worker_key(name: str) -> str:
    return f"mora:worker:{name}"


def chat_stream_key(request_id: str) -> str:
    """A chat request's snapshots: entries with `texts` (a JSON list, one text per row), `done` ("0"/"1"), `error`."""
    return f"mora:chat:{request_id}"


def chat_stop_key(request_id: str) -> str:
    """Set by the web process (Stop button, a page gone) to end a chat request's generation after its next token."""
    return f"mora:chat:{request_id}:stop"


def reply_key(request_id: str) -> str:
    """The list a utility call's one reply is pushed onto."""
    return f"mora:reply:{request_id}"


def connect(url: str) -> redis.Redis:
    """A client that retries through short outages (a Redis restart) instead of failing the caller at once."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10, health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class RedisStreamSink:
    """Publishes a run's events on its stream and never loses one to a Redis outage or restart.

    It keeps every payload it has sent. The marker key is set whenever the stream is known to hold all of them; if the
    marker is gone (Redis restarted empty) or a publish failed (Redis down), the next publish re-sends the whole run.
    Publishing never raises for a connection problem: the run goes on, and the replay catches up.
    """

    def __init__(self, client: redis.Redis, run_id: str, key: Optional[str] = None) -> None:
        """`key`: another stream than the run's (an evaluation's); its marker is `key:marker`."""
        self.client, self.run_id = client, run_id
        self.stream = key or stream_key(run_id)
        self.marker = f"{key}:marker" if key else marker_key(run_id)
        self.sent: list[str] = []
        self._replay = False
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event, default=str)
        with self._lock:
            self.sent.append(payload)
            try:
                if self._replay or not self.client.exists(self.marker):
                    self._publish(self.sent)
                else:
                    self._publish([payload])
                self._replay = False
            except (redis.ConnectionError, redis.TimeoutError):
                self._replay = True

    def _publish(self, payloads: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.stream, {"event": payload}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.sadd(STREAMS_SET, self.stream)
        pipe.set(self.marker, "1", ex=STATE_TTL_S)
        pipe.execute()


def request_cancel(client: redis.Redis, run_id: str) -> None:
    client.set(cancel_key(run_id), "1", ex=STATE_TTL_S)


def cancel_requested(client: redis.Redis, run_id: str) -> bool:
    return bool(client.exists(cancel_key(run_id)))


def request_eval_cancel(client: redis.Redis, eval_id: str) -> None:
    client.set(eval_cancel_key(eval_id), "1", ex=STATE_TTL_S)


def eval_cancel_requested(client: redis.Redis, eval_id: str) -> bool:
    return bool(client.exists(eval_cancel_key(eval_id)))


def set_state(client: redis.Redis, run_id: str, status: str) -> None:
    client.set(state_key(run_id), status, ex=STATE_TTL_S)


def get_state(client: redis.Redis, run_id: str) -> Optional[str]:
    return client.get(state_key(run_id))


class Heartbeat:
    """A thread that keeps a run's heartbeat key alive while it trains; its absence means the worker is gone."""

    def __init__(self, client: redis.Redis, run_id: str, worker: str) -> None:
        self.client, self.run_id, self.worker = client, run_id, worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{run_id}")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self.client.delete(heartbeat_key(self.run_id))
        except redis.RedisError:
            pass

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.set(heartbeat_key(self.run_id), self.worker, ex=math.ceil(heartbeat_ttl_s()))
            except redis.RedisError:
                pass  # Redis restarting: the next beat recreates the key
            self._stop.wait(heartbeat_every_s())


def heartbeat_alive(client: redis.Redis, run_id: str) -> bool:
    return bool(client.exists(heartbeat_key(run_id)))


def worker_name(queue: str) -> str:
    return f"{queue}@{socket.gethostname()}"


def announce_worker(client: redis.Redis, name: str, info: dict[str, Any]) -> None:
    """Register a worker's device and state for the System tab; the key expires if the worker stops announcing."""
    client.set(worker_key(name), json.dumps({**info, "name": name, "seen": time.time()}), ex=WORKER_TTL_S)
    client.sadd(WORKERS_SET, name)


def list_workers(client: redis.Redis) -> list[dict[str, Any]]:
    workers = []
    for name in sorted(client.smembers(WORKERS_SET)):
        raw = client.get(worker_key(name))
        if raw is None:
            client.srem(WORKERS_SET, name)
            continue
        workers.append(json.loads(raw))
    return workers


def queue_lengths(client: redis.Redis, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Jobs waiting in each Celery queue (Celery's Redis transport keeps a queue as a list under its name)."""
    return {queue: int(client.llen(queue)) for queue in queues}


def add_chat_snapshot(client: redis.Redis, request_id: str, texts: list[str], done: bool,
                      error: Optional[str], stopped: Optional[str] = None,
                      extra: Optional[dict[str, Any]] = None) -> None:
    """`stopped` says why a final answer ended early (a Stop, the time limit); its texts are what was generated.
    `extra` carries what an API answer needs besides (token counts, why it ended, the kind of error)."""
    key = chat_stream_key(request_id)
    fields = {"texts": json.dumps(texts), "done": "1" if done else "0", "error": error or "", "stopped": stopped or ""}
    if extra is not None:
        fields["extra"] = json.dumps(extra)
    pipe = client.pipeline(transaction=False)
    pipe.xadd(key, fields, maxlen=CHAT_STREAM_MAXLEN, approximate=True)
    pipe.expire(key, CHAT_TTL_S)
    pipe.execute()


def read_chat_snapshot(fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry as `{"texts": [...], "done": bool, "error": str | None, "stopped": str | None}`, with
    `"extra": {...}` when the entry has one."""
    snapshot = {"texts": json.loads(fields.get("texts") or "[]"), "done": fields.get("done") == "1",
                "error": fields.get("error") or None, "stopped": fields.get("stopped") or None}
    if "extra" in fields:
        snapshot["extra"] = json.loads(fields["extra"])
    return snapshot


def last_chat_snapshot(client: redis.Redis, request_id: str) -> Optional[dict[str, Any]]:
    entries = client.xrevrange(chat_stream_key(request_id), count=1)
    return read_chat_snapshot(entries[0][1]) if entries else None


def push_reply(client: redis.Redis, request_id: str, reply: dict[str, Any]) -> None:
    key = reply_key(request_id)
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, json.dumps(reply))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def request_chat_stop(client: redis.Redis, request_id: str) -> None:
    client.set(chat_stop_key(request_id), "1", ex=CHAT_TTL_S)


def chat_stop_requested(client: redis.Redis, request_id: str) -> bool:
    return bool(client.exists(chat_stop_key(request_id)))
