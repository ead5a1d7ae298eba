"""The workers' public API for the web process: send jobs, flag cancels, read the worker roster and queues, chat,
and ask a chat worker what only a tokenizer or a model definition can tell (`call_worker`).

Torch-free and task-module-free: jobs are sent by task name, so the web host never imports the training code.
"""
from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any, Iterator, Optional

import redis

from workers import bus
from celery import Celery

from workers.celery_app import CHAT_QUEUE, CHAT_TASK, TRAIN_QUEUE, TRAIN_TASK, UTILITY_TASK, make_celery
from workers.settings import redis_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CHAT_ANSWER_WITHIN_S = 30
_BLOCK_S = 5.0  # one blocking read, kept under the client's socket timeout (10 s)
START_CHAT_WORKER = "start one with mora-studio worker --queues chat"


class WorkerUnavailable(RuntimeError):
    """No chat worker answered a call in time: none is running, or all are busy."""


@functools.lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return bus.connect(url)


@functools.lru_cache(maxsize=4)
def _celery(url: str) -> Celery:
    return make_celery(url)


def client() -> redis.Redis:
    return _client(redis_url() or DEFAULT_URL)


def submit_training(run_id: str, config: dict[str, Any], run_dir: str, resume_from: Optional[str] = None) -> None:
    """Queue a training job; the run record must already exist in the store as `queued`."""
    _celery(redis_url() or DEFAULT_URL).send_task(TRAIN_TASK, args=[run_id, config, run_dir, resume_from],
                                                  queue=TRAIN_QUEUE)


def request_cancel(run_id: str) -> None:
    """Flag a run to stop: a queued one will never start, a running one stops after its current step."""
    bus.request_cancel(client(), run_id)


def workers() -> list[dict[str, Any]]:
    return bus.list_workers(client())


def queue_lengths() -> dict[str, int]:
    return bus.queue_lengths(client())


def start_chat(request: dict[str, Any]) -> str:
    """Queue a chat request (its shape is in `workers.chat`) and return its id, to read with `chat_updates`.

    A request no worker has picked up within `CHAT_ANSWER_WITHIN_S` is dropped: its caller has given up by then."""
    request_id = uuid.uuid4().hex
    _celery(redis_url() or DEFAULT_URL).send_task(CHAT_TASK, args=[request_id, request], queue=CHAT_QUEUE,
                                                  expires=CHAT_ANSWER_WITHIN_S)
    return request_id


def chat_updates(request_id: str, timeout_s: float = 120,
                 answer_within_s: float = CHAT_ANSWER_WITHIN_S) -> Iterator[dict[str, Any]]:
    """Yield `{"texts": [...], "done": bool, "error": str | None}` as the worker publishes them, until one is done.

    The worker answers at once with empty texts when it takes the request; if nothing comes within
    `answer_within_s`, or the worker then stays silent for `timeout_s` (loading a model included), the last item
    is an error. When several snapshots wait, only the newest is yielded: each holds every row's whole text."""
    key = bus.chat_stream_key(request_id)
    last_id, texts, answered = "0-0", [], False
    deadline = time.monotonic() + answer_within_s
    while (remaining := deadline - time.monotonic()) > 0:
        entries = client().xread({key: last_id}, block=max(1, int(min(remaining, _BLOCK_S) * 1000)))
        if not entries:
            continue
        last_id, fields = entries[0][1][-1]
        update = bus.read_chat_snapshot(fields)
        texts, answered = update["texts"], True
        deadline = time.monotonic() + timeout_s
        yield update
        if update["done"] or update["error"]:
            return
    if answered:
        yield {"texts": texts, "done": True, "error": f"the chat worker sent nothing for {timeout_s:g} s"}
    else:
        yield {"texts": [], "done": True,
               "error": f"no chat worker answered within {answer_within_s:g} s; {START_CHAT_WORKER}"}


def call_worker(kind: str, payload: dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
    """Ask a chat worker for a small answer (kinds and payloads: `workers.utility`) and wait for it.

    Problems with the payload come back as `{"error": message}`; no answer within `timeout_s` raises
    `WorkerUnavailable` (and the call is dropped from the queue, so a worker started later skips it)."""
    request_id = uuid.uuid4().hex
    _celery(redis_url() or DEFAULT_URL).send_task(UTILITY_TASK, args=[request_id, kind, payload], queue=CHAT_QUEUE,
                                                  expires=timeout_s)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        item = client().blpop([bus.reply_key(request_id)], timeout=max(0.01, min(remaining, _BLOCK_S)))
        if item is not None:
            return json.loads(item[1])
    raise WorkerUnavailable(f"no chat worker answered the {kind!r} call within {timeout_s:g} s; {START_CHAT_WORKER}")
