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

from kombu.exceptions import OperationalError

from workers.celery_app import (CHAT_QUEUE, CHAT_TASK, EVAL_TASK, SENT_TTL_S, SERVE_TASK, TRAIN_QUEUE, TRAIN_TASK,
                                UTILITY_QUEUE, UTILITY_TASK, make_celery, sent_key)
from workers.settings import redis_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CHAT_ANSWER_WITHIN_S = 30
_BLOCK_S = 5.0  # one blocking read, kept under the client's socket timeout (10 s)
START_CHAT_WORKER = "start one with mora-studio worker --queues chat"
# A cheap bound in characters before anything is queued; the worker then counts tokens against the model's context.
MAX_MESSAGE_CHARS = 32_000
MAX_CONVERSATION_CHARS = 128_000


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


class QueueUnavailable(RuntimeError):
    """The broker could not take a job: Redis is down or unreachable. The message says what to start or set."""


def submit_training(run_id: str, config: dict[str, Any], run_dir: str, resume_from: Optional[str] = None) -> None:
    """Queue a training job; the run record must already exist in the store as `queued`. Marks it sent first (the
    reconciler re-sends a queued run whose mark a Redis restart erased); raises `QueueUnavailable` if Redis is down."""
    url = redis_url() or DEFAULT_URL
    try:
        client().set(sent_key(run_id), "1", ex=SENT_TTL_S)
        _celery(url).send_task(TRAIN_TASK, args=[run_id, config, run_dir, resume_from], queue=TRAIN_QUEUE,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except (redis.RedisError, OSError, OperationalError) as error:
        raise QueueUnavailable(
            f"cannot reach the queue's Redis at {_without_password(url)} ({error}); start the studio with "
            "`mora-studio up`, or set REDIS_URL to the studio's Redis") from error


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if "@" in rest else url


def submit_evaluation(eval_id: str, request: dict[str, Any]) -> None:
    """Queue an evaluation (its request: `workers.evaluation.EvalRequest` as a dict) on the chat queue; the record
    must already exist in the store as `queued`. Raises `QueueUnavailable` if Redis is down."""
    url = redis_url() or DEFAULT_URL
    try:
        _celery(url).send_task(EVAL_TASK, args=[eval_id, request], queue=CHAT_QUEUE,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except (redis.RedisError, OSError, OperationalError) as error:
        raise QueueUnavailable(f"cannot reach the queue's Redis at {_without_password(url)} ({error}); start the "
                               "studio with `mora-studio up`") from error


def cancel_evaluation(eval_id: str) -> None:
    """Stop an evaluation after its current batch; what it answered so far is kept."""
    bus.request_eval_cancel(client(), eval_id)


def request_cancel(run_id: str) -> None:
    """Flag a run to stop: a queued one will never start, a running one stops after its current step."""
    bus.request_cancel(client(), run_id)


def workers() -> list[dict[str, Any]]:
    return bus.list_workers(client())


def queue_lengths() -> dict[str, int]:
    return bus.queue_lengths(client())


class ChatRefused(ValueError):
    """A chat request too large to send; the message says which limit and what to change."""


def chat_size_problem(conversations: list[list[dict[str, Any]]]) -> Optional[str]:
    """What is too long in these conversations, in characters (a message, or one whole conversation), or None."""
    for conversation in conversations:
        total = 0
        for position, message in enumerate(conversation, 1):
            length = len(message.get("content") or "") if isinstance(message, dict) else 0
            total += length
            if length > MAX_MESSAGE_CHARS:
                return (f"message {position} is {length:,} characters; a chat message holds at most "
                        f"{MAX_MESSAGE_CHARS:,}: shorten it")
        if total > MAX_CONVERSATION_CHARS:
            return (f"the conversation is {total:,} characters; a chat holds at most {MAX_CONVERSATION_CHARS:,}: "
                    f"start a new conversation")
    return None


def start_chat(request: dict[str, Any]) -> str:
    """Queue a chat request (its shape is in `workers.chat`) and return its id, to read with `chat_updates`.

    A request past the character limits raises `ChatRefused` and is not queued. A request no worker has picked up
    within `CHAT_ANSWER_WITHIN_S` is dropped: its caller has given up by then."""
    conversations = request.get("conversations") or [request.get("messages") or []]
    problem = chat_size_problem([c for c in conversations if isinstance(c, list)])
    if problem:
        raise ChatRefused(problem)
    request_id = uuid.uuid4().hex
    _celery(redis_url() or DEFAULT_URL).send_task(CHAT_TASK, args=[request_id, request], queue=CHAT_QUEUE,
                                                  expires=CHAT_ANSWER_WITHIN_S)
    return request_id


def start_serving(request: dict[str, Any]) -> str:
    """Queue an API request (its shape is in `workers.serving`) and return its id, to read with `chat_updates`.

    The request waits on one list with the others; a doorbell task tells a chat worker to answer all that arrived
    together in one batch. Past the character limits it raises `ChatRefused`; Redis unreachable, `QueueUnavailable`.
    A request no worker has taken within `CHAT_ANSWER_WITHIN_S` is dropped unanswered."""
    if request.get("messages") is not None:
        problem = chat_size_problem([request["messages"]] if isinstance(request["messages"], list) else [])
        if problem:
            raise ChatRefused(problem)
    request_id = uuid.uuid4().hex
    now = time.time()
    item = json.dumps({**request, "id": request_id, "enqueued_at": now, "expires_at": now + CHAT_ANSWER_WITHIN_S})
    url = redis_url() or DEFAULT_URL
    try:
        pipe = client().pipeline(transaction=False)
        pipe.rpush(bus.SERVE_PENDING, item)
        pipe.expire(bus.SERVE_PENDING, 2 * CHAT_ANSWER_WITHIN_S)  # no worker for a while: nothing piles up
        pipe.execute()
        _celery(url).send_task(SERVE_TASK, queue=CHAT_QUEUE, expires=CHAT_ANSWER_WITHIN_S)
    except (redis.RedisError, OSError, OperationalError) as error:
        raise QueueUnavailable(f"cannot reach the queue's Redis at {_without_password(url)} ({error})") from error
    return request_id


def stop_chat(request_id: str) -> None:
    """Ask the worker to end this request's answer after its current token; what was generated is kept."""
    bus.request_chat_stop(client(), request_id)


def chat_updates(request_id: str, timeout_s: float = 120,
                 answer_within_s: float = CHAT_ANSWER_WITHIN_S) -> Iterator[dict[str, Any]]:
    """Yield `{"texts": [...], "done": bool, "error": str | None, "stopped": str | None}` as the worker publishes
    them, until one is done (`stopped`: why a finished answer ended early).

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
    """Ask the utility worker (started with every chat worker) for a small answer (kinds and payloads:
    `workers.utility`) and wait for it.

    Problems with the payload come back as `{"error": message}`; no answer within `timeout_s` raises
    `WorkerUnavailable` (and the call is dropped from the queue, so a worker started later skips it)."""
    request_id = uuid.uuid4().hex
    _celery(redis_url() or DEFAULT_URL).send_task(UTILITY_TASK, args=[request_id, kind, payload],
                                                  queue=UTILITY_QUEUE, expires=timeout_s)
    reply = _wait_for_reply(request_id, timeout_s)
    if reply is None:
        raise WorkerUnavailable(f"no chat worker answered the {kind!r} call within {timeout_s:g} s; "
                                f"{START_CHAT_WORKER}")
    return reply


def _wait_for_reply(request_id: str, timeout_s: float) -> Optional[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        item = client().blpop([bus.reply_key(request_id)], timeout=max(0.01, min(remaining, _BLOCK_S)))
        if item is not None:
            return json.loads(item[1])
    return None


EXPORT_TIME_LIMIT_S = 3600


def export_run(request: dict[str, Any], timeout_s: float = EXPORT_TIME_LIMIT_S) -> dict[str, Any]:
    """Have the utility worker export a run (`request`: a `workers.export.ExportRequest` as a dict) into the data
    folder's exports/ and wait for it: its result (`path`, `size_bytes`, `files`, `check`, `summary`) or
    `{"error": message}`, a refusal (the worker is busy with another export, the format does not fit the run) or a
    failure. The worker answers at once that it started; no answer raises `WorkerUnavailable`."""
    export_id = uuid.uuid4().hex
    started = call_worker("export", {"export_id": export_id, "request": request})
    if "error" in started:
        return started
    reply = _wait_for_reply(export_id, timeout_s)
    return reply if reply is not None else {"error": f"the export sent no result within {timeout_s:g} s"}
