"""Enqueueing jobs from the API: sends Celery tasks by name, so the API never imports torch.

Job state lives in the job store, so tasks are sent with `ignore_result=True`: otherwise
Celery's Redis result backend subscribes to a result channel for every task sent (a pub/sub
round trip per request), whatever `task_ignore_result` says.
"""

from __future__ import annotations

from celery import Celery

from loramill.settings import Settings
from workers.celery_app import MERGE_QUEUE, MERGE_TASK, TRAIN_QUEUE, TRAIN_TASK, create_celery


class JobQueue:
    def __init__(self, settings: Settings):
        self.celery: Celery = create_celery(settings)

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
