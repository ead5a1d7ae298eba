"""The workers' public API for the web process: send jobs, flag cancels, read the worker roster and queues.

Torch-free and task-module-free: jobs are sent by task name, so the web host never imports the training code.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import redis

from workers import bus
from celery import Celery

from workers.celery_app import TRAIN_QUEUE, TRAIN_TASK, make_celery
from workers.settings import redis_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"


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
