"""The reconciler: runs in the web process and sends again the queued runs whose task the broker no longer holds.

The embedded Redis keeps nothing, so a restart loses every queued task while the store still says `queued`.
Sending a task sets the run's sent mark in Redis (`workers.celery_app.sent_key`); a queued run without the mark on
two checks in a row (so a run just being sent, or just taken by a worker, is left alone) is sent again. Re-sending
is safe: a worker skips a run whose state is final or that another worker holds (its heartbeat claim,
`workers.queued`), so a run never trains twice.
"""
from __future__ import annotations

import logging
import threading

import redis

from storage.repo import NotFound, Store
from workers import api, bus
from workers.celery_app import sent_key

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, store: Store, redis_url: str, every_s: float = 10.0) -> None:
        self.store = store
        self.client = bus.connect(redis_url)
        self.every_s = every_s
        self._unmarked: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Reconciler":
        self._thread = threading.Thread(target=self.run_forever, daemon=True, name="queue-reconciler")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.check_once()
            except (redis.RedisError, api.QueueUnavailable) as error:  # Redis restarting: the next check catches up
                log.warning("reconciler: Redis unavailable (%s); retrying", error)
            except Exception:
                log.exception("reconciler: unexpected error")

    def check_once(self) -> list[str]:
        """Send again the queued runs that were unmarked at the previous check too; return their ids."""
        unmarked, resent = set(), []
        for run in self.store.runs_with_status(["queued"]):
            if self.client.exists(sent_key(run.id)) or bus.heartbeat_alive(self.client, run.id):
                continue
            if run.id not in self._unmarked:
                unmarked.add(run.id)
                continue
            resume_from = self._parent_dir(run.parent_id)
            api.submit_training(run.id, run.config, run.run_dir, resume_from=resume_from)
            log.info("reconciler: run %s was queued but the broker had lost its task; sent it again", run.id)
            resent.append(run.id)
        self._unmarked = unmarked
        return resent

    def _parent_dir(self, parent_id: str | None) -> str | None:
        if parent_id is None:
            return None
        try:
            return self.store.get_run(parent_id).run_dir
        except NotFound:
            return None
