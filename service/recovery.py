"""Work orphaned by a crash in the embedded default, sent to the queue again.

kombu's `filesystem://` transport deletes a message as soon as a worker takes it, so the task
of a worker that died (killed, machine restarted) is gone; Redis, by contrast, redelivers an
unacknowledged message after the visibility timeout. In the embedded default the only worker is
the one `loramill serve` starts, so when `serve` starts, every job or merge still `running` was
orphaned and is enqueued again: training resumes from its last checkpoint, a merge starts over.
`hold_embedded_lock` makes sure no other `serve` runs an embedded worker on the same data dir.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from sqlalchemy import select

from adapters.errors import InputError
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


def hold_embedded_lock(data_dir: Path):
    """An exclusive lock on `<data_dir>/embedded.lock` for this process's life: one embedded worker per data dir.

    A second `serve` would re-enqueue, as orphans, the jobs the first one's worker is running.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "embedded.lock", "w")  # noqa: SIM115 — kept open: the lock lives with it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"another `loramill serve` runs the embedded worker for {data_dir.resolve()}") from None
    return handle
