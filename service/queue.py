"""Enqueueing jobs from the API: sends Celery tasks by name, so the API never imports torch.

Job state lives in the job store, so tasks are sent with `ignore_result=True`: otherwise
Celery's Redis result backend subscribes to a result channel for every task sent (a pub/sub
round trip per request), whatever `task_ignore_result` says. With a Redis broker, the API
publishes through `service.redis_transport` (kombu's transport, one redis-py client per channel
instead of one per message). Producers and their broker connections come from Celery's
producer pool, so a request opens no connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from loramill.settings import Settings
from service.errors import APIError
from service.redis_transport import PublishTransport
from service.store import move
from workers.celery_app import (
    MERGE_QUEUE,
    MERGE_TASK,
    TRAIN_QUEUE,
    TRAIN_TASK,
    create_celery,
)

log = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, settings: Settings):
        self.celery: Celery = create_celery(settings)
        if (settings.broker_url or "").startswith(("redis://", "rediss://")):
            self.celery.conf.broker_transport = PublishTransport

    def enqueue_training(self, job_id: str) -> None:
        self.celery.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE, ignore_result=True)

    def enqueue_merge(self, merge_id: str) -> None:
        self.celery.send_task(MERGE_TASK, args=[merge_id], queue=MERGE_QUEUE, ignore_result=True)

    def ping(self) -> None:
        """Raise if the broker cannot be reached within a couple of seconds."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def depths(self) -> dict[str, int]:
        """Messages waiting in each queue (not counting ones a worker holds unacknowledged)."""
        with self.celery.connection_for_read() as conn:
            channel = conn.default_channel
            return {q: channel.queue_declare(queue=q).message_count for q in (TRAIN_QUEUE, MERGE_QUEUE)}


def commit_then_enqueue(session: Session | Connection, table, row_id: str, enqueue: Callable[[str], None],
                        what: str) -> None:
    """Commit the new row, then enqueue its task: a task never runs before its row exists.

    If the broker refuses, the row is marked failed (`broker_unavailable`) and the request
    answers 503, so no row stays `queued` with nothing to run it.
    """
    session.commit()
    try:
        enqueue(row_id)
    except Exception as exc:  # noqa: BLE001 — any broker failure: the task cannot run
        log.exception("enqueue of %s failed", row_id)
        move(session, table, row_id, ("queued",), "failed",
             error={"code": "broker_unavailable", "message": f"could not enqueue the {what}: {exc}", "param": None})
        session.commit()
        raise APIError(503, f"The job queue is unavailable; the {what} was marked failed", code="broker_unavailable") from exc
