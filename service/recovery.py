"""Work orphaned by a crash in the embedded default, sent to the queue again.

kombu's `filesystem://` transport deletes a message as soon as a worker takes it, so the task
of a worker that died (killed, machine restarted) is gone; Redis, by contrast, redelivers an
unacknowledged message after the visibility timeout. In the embedded default the only worker is
the one `loramill serve` starts, so when `serve` starts, every job or merge still `running` was
orphaned and is enqueued again: training resumes from its last checkpoint, a merge starts over.
"""

from __future__ import annotations

from sqlalchemy import select

from service.db import Database
from service.queue import JobQueue
from service.tables import JobRow, MergeRow


def requeue_orphans(db: Database, queue: JobQueue) -> list[str]:
    """Enqueue every `running` job and merge again; returns their ids. Only for a broker with no redelivery."""
    with db.sessions() as session:
        jobs = list(session.scalars(select(JobRow.id).where(JobRow.status == "running").order_by(JobRow.seq)))
        merges = list(session.scalars(select(MergeRow.id).where(MergeRow.status == "running").order_by(MergeRow.seq)))
    for job_id in jobs:
        queue.enqueue_training(job_id)
    for merge_id in merges:
        queue.enqueue_merge(merge_id)
    return jobs + merges
