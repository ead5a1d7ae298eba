"""Celery tasks: thin wrappers that receive ids and plain dicts and call the plain functions that do the work."""
from __future__ import annotations

from typing import Any, Optional

from celery.signals import worker_ready, worker_shutdown

from workers import job_process
from workers.celery_app import CHAT_TASK, EVAL_TASK, SERVE_TASK, TRAIN_QUEUE, TRAIN_TASK, UTILITY_TASK, app
from workers.chat import run_queued_chat
from workers.evaluation import run_queued_evaluation
from workers.queued import WorkerPresence, run_queued_training
from workers.serving import run_waiting_requests
from workers.settings import redis_url
from workers.utility import run_queued_utility

_presence: dict[str, WorkerPresence] = {}


@app.task(name=TRAIN_TASK, bind=True)
def train_run(self, run_id: str, config: dict[str, Any], run_dir: str, resume_from: Optional[str] = None) -> str:
    return run_queued_training(redis_url() or app.conf.broker_url, run_id, config, run_dir, resume_from,
                               worker=self.request.hostname or "worker")


@app.task(name=CHAT_TASK)
def chat_generate(request_id: str, request: dict[str, Any]) -> None:
    run_queued_chat(redis_url() or app.conf.broker_url, request_id, request)


@app.task(name=SERVE_TASK)
def serve_waiting() -> None:
    run_waiting_requests(redis_url() or app.conf.broker_url)


@app.task(name=EVAL_TASK, bind=True)
def evaluate(self, eval_id: str, request: dict[str, Any]) -> None:
    run_queued_evaluation(redis_url() or app.conf.broker_url, eval_id, request, worker=self.request.hostname or "")


@app.task(name=UTILITY_TASK)
def utility(request_id: str, kind: str, payload: dict[str, Any]) -> None:
    run_queued_utility(redis_url() or app.conf.broker_url, request_id, kind, payload)


@worker_ready.connect
def _announce(sender=None, **kwargs) -> None:
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    if TRAIN_QUEUE in queues:
        job_process.start_server()  # torch imported once now, not at the first job
    _presence["worker"] = WorkerPresence(redis_url() or app.conf.broker_url, sender.hostname, queues).start()


@worker_shutdown.connect
def _retire(**kwargs) -> None:
    if "worker" in _presence:
        _presence.pop("worker").stop()
