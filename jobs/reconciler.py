"""Jobs that no worker will run, found in the store and sent to the queue again.

Two ways a job gets stranded, whatever the broker:
- **Its worker vanished.** The process was killed, its machine died or it hung: its lease stops
  being renewed and expires (`lease_ttl_s`). Redis would redeliver its unacknowledged message only
  after the visibility timeout (48 h by default); the filesystem transport never does. The
  reconciler moves the job back to `queued` (or to `cancelled` if that was asked) and resends
  its task, so it runs again within a lease's lifetime plus one reconcile interval.
- **Its message was lost.** A broker restarted without persistence forgets what was queued.
  The store knows how many jobs of each queue are `queued`; the broker says how many messages
  wait there. When fewer messages wait than jobs were enqueued more than `resend_after_s` ago,
  the oldest of those are sent again.

Each round also forgets idempotency keys older than their time to live (`jobs.idempotency`).

Sending twice is harmless: a task's first act is a conditional claim (`jobs.lifecycle.claim`),
so a second message for a job that is running or finished ends at once. Each resend is recorded
with a conditional UPDATE of `enqueued_at`, so several API replicas reconciling at once resend
a job once.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import func, or_, select, update

from jobs import idempotency
from jobs.db import Database
from jobs.lifecycle import KINDS, JobKind, new_event, now
from jobs.queue import JobQueue

log = logging.getLogger(__name__)


class Reconciler:
    """`run_once()` requeues stranded jobs and returns their ids; `start()` runs it every `interval_s` in a thread."""

    def __init__(self, db: Database, queue: JobQueue, *, interval_s: float, resend_after_s: float,
                 idempotency_ttl_s: float | None = None):
        self.db, self.queue, self.interval_s, self.resend_after_s = db, queue, interval_s, resend_after_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[str]:
        sent = []
        depths = None
        for kind in KINDS:
            for job_id in self._requeue_expired(kind):
                self.queue.send(kind.queue, kind.task, job_id)
                sent.append(job_id)
        for kind in KINDS:
            if depths is None:
                depths = self.queue.depths()
            for job_id in self._lost_messages(kind, depths[kind.queue]):
                self.queue.send(kind.queue, kind.task, job_id)
                sent.append(job_id)
        if self.idempotency_ttl_s is not None:
            idempotency.purge_expired(self.db, self.idempotency_ttl_s)
        return sent

    def _requeue_expired(self, kind: JobKind) -> list[str]:
        """Running jobs whose lease expired: back to `queued` (or `cancelled` if asked); their ids to send."""
        table, at = kind.table, now()
        expired = (table.status == "running", or_(table.lease_expires_at.is_(None), table.lease_expires_at < at))
        lease_off = {"lease_token": None, "lease_expires_at": None}
        with self.db.sessions() as session:
            cancelled = session.scalars(update(table).where(*expired, table.cancel_requested.is_(True)).values(
                status="cancelled", finished_at=int(at), **lease_off).returning(table.id)).all()
            requeued = session.scalars(update(table).where(*expired).values(
                status="queued", enqueued_at=at, **lease_off).returning(table.id)).all()
            for job_id in cancelled:
                session.add(new_event(kind, job_id, "Cancelled: its worker stopped before it could finish"))
            for job_id in requeued:
                session.add(new_event(kind, job_id, "Its worker stopped responding; the job is queued again",
                                      level="warning"))
            session.commit()
        for job_id in requeued:
            log.warning("%s %s: lease expired, queued again", kind.noun, job_id)
        return list(requeued)

    def _lost_messages(self, kind: JobKind, waiting_messages: int) -> list[str]:
        """Queued jobs whose message the broker no longer holds (oldest first): their ids to send again."""
        table, at = kind.table, now()
        stale = or_(table.enqueued_at.is_(None), table.enqueued_at < at - self.resend_after_s)
        with self.db.sessions() as session:
            queued = session.scalar(select(func.count()).select_from(table).where(table.status == "queued"))
            missing = queued - waiting_messages
            if missing <= 0:
                return []
            oldest = session.scalars(select(table.id).where(table.status == "queued", stale)
                                     .order_by(table.seq).limit(missing)).all()
            if not oldest:
                return []
            resent = session.scalars(update(table).where(table.id.in_(oldest), table.status == "queued", stale)
                                     .values(enqueued_at=at).returning(table.id)).all()
            session.commit()
        for job_id in resent:
            log.warning("%s %s: queued but the broker holds no message for it; sent again", kind.noun, job_id)
        return list(resent)

    def expire_all_leases(self) -> None:
        """Treat every running job's lease as expired (its only possible worker is known to be dead)."""
        with self.db.sessions() as session:
            for kind in KINDS:
                session.execute(update(kind.table).where(kind.table.status == "running").values(lease_expires_at=0.0))
            session.commit()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.run_once()
                except Exception:  # noqa: BLE001 — the store or the broker blinked: try again next round
                    log.exception("reconciler round failed")

        self._thread = threading.Thread(target=loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
