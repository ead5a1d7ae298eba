"""The Celery application: Redis broker, three queues, JSON only, one job per worker process at a time.

`train` jobs run one at a time per GPU (a worker process per GPU); `chat` jobs run on their own worker process so an
answer never waits for a training run to end; `utility` calls (preview, budget) on a third, so they never wait for
an answer to end. Tasks are acknowledged late, so a job whose worker dies is not lost,
and carry only ids and plain config dicts. Importing this module does not import torch: the web process sends tasks
by name through `workers.api`.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from workers.settings import redis_url

TRAIN_QUEUE = "train"
CHAT_QUEUE = "chat"
UTILITY_QUEUE = "utility"  # its own worker process, so a preview or a budget never waits behind a generation
QUEUES = (TRAIN_QUEUE, CHAT_QUEUE, UTILITY_QUEUE)
TRAIN_TASK = "mora.train_run"
CHAT_TASK = "mora.chat_generate"
SERVE_TASK = "mora.serve"  # a doorbell: the chat worker answers every waiting API request (workers.serving)
UTILITY_TASK = "mora.utility"  # small request/reply calls (preview, budget) the web process cannot do without torch
EVAL_TASK = "mora.evaluate"  # on the chat queue: its worker's resident models and adapters answer (workers.evaluation)
SENT_TTL_S = 30 * 24 * 3600


def sent_key(run_id: str) -> str:
    """Set when a run's training task is sent. The embedded Redis keeps nothing, so after a restart the key is gone
    together with the queued task: that is how the reconciler (`workers.reconciler`) knows to send it again."""
    return f"mora:run:{run_id}:sent"


def make_celery(broker_url: str | None = None) -> Celery:
    app = Celery("mora_studio", broker=broker_url or redis_url() or "redis://127.0.0.1:6379/0")
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=tuple(Queue(name) for name in QUEUES),
        task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}, CHAT_TASK: {"queue": CHAT_QUEUE},
                     SERVE_TASK: {"queue": CHAT_QUEUE}, UTILITY_TASK: {"queue": UTILITY_QUEUE},
                     EVAL_TASK: {"queue": CHAT_QUEUE}},
        task_default_queue=TRAIN_QUEUE,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 7 * 24 * 3600},  # long runs must not be redelivered
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        imports=("workers.tasks",),
    )
    return app


app = make_celery()
