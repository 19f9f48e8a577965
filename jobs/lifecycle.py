"""One life cycle for every kind of job (fine-tuning jobs and merges): a job is never lost and never run twice.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
      ▲                  │
      └── reconciler ────┘   lease expired: its worker died, hung or was cut off

- **Claim** (`claim`): one conditional UPDATE moves a `queued` job (or a `running` one whose
  lease has expired) to `running` with a fresh random `lease_token` and `lease_expires_at =
  now + ttl`. Two workers handed the same job (a redelivered or resent message) race on that
  UPDATE and one wins; the other's task ends at once.
- **Lease** (`Lease`): its holder renews it, from a heartbeat thread and with every write.
  Every write a worker makes goes through `Lease.transaction()`, whose first statement is the
  renewal, conditional on `lease_token = :token AND status = 'running'`. When no row matches,
  the lease is gone (it expired and the job was requeued or claimed by another worker): the
  transaction is rolled back and `LeaseLost` raised, so a stale worker writes nothing and
  stops. The renewal locks the row (PostgreSQL) or the database (SQLite) until the commit, so
  a competing claim or requeue waits and then sees the renewed expiry.
- **Ends** (`Lease.succeed`, `Lease.fail`, `Lease.finish_cancelled`) are fenced writes too.
- **Cancel** (`request_cancel`, from the API): a queued job is cancelled at once; a running one is
  flagged, and its worker learns of it from its next renewal (`Lease.cancel_requested`) and stops.
- **Events**: one event log per kind (`JobKind.events`), written with `new_event`.

Files follow the same rule by place: an attempt writes only under names of its own (its
attempt directory, or a temporary directory renamed at the end), so a stale attempt never
overwrites the live one's files; a new claim sweeps what dead attempts left (the worker code).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.db import Database
from jobs.errors import Conflict, Unavailable
from jobs.ids import new_id
from jobs.queue import MERGE_QUEUE, MERGE_TASK, TRAIN_QUEUE, TRAIN_TASK, JobQueue
from jobs.store import FINISHED
from jobs.tables import JobEventRow, JobRow, MergeEventRow, MergeRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobKind:
    """What differs between kinds of job: their tables, their queue, and what a message calls them."""

    name: str  # "fine_tuning" | "merge": metrics labels
    noun: str  # in messages: "fine-tuning job", "merge"
    short: str  # in error codes: "job_finished", "merge_finished"
    id_param: str  # the API parameter naming one: "fine_tuning_job_id", "merge_id"
    table: type[JobRow] | type[MergeRow]
    events: type[JobEventRow] | type[MergeEventRow]
    event_owner: str  # the events table's column naming the job
    event_prefix: str
    queue: str
    task: str


FINE_TUNING = JobKind("fine_tuning", "fine-tuning job", "job", "fine_tuning_job_id", JobRow, JobEventRow, "job_id",
                      "ftevent", TRAIN_QUEUE, TRAIN_TASK)
MERGE = JobKind("merge", "merge", "merge", "merge_id", MergeRow, MergeEventRow, "merge_id", "mergeevent", MERGE_QUEUE,
                MERGE_TASK)
KINDS = (FINE_TUNING, MERGE)


class LeaseLost(Exception):
    """This worker no longer holds the job: another attempt owns it now. Write nothing more; stop."""


class Cancelled(Exception):
    """Raised by a job's work when it stopped because cancellation was requested.

    The message becomes the job's last event; `values` are columns to set as it ends (e.g. tokens trained).
    """

    def __init__(self, message: str, **values):
        super().__init__(message)
        self.values = values


def now() -> float:
    return time.time()


def new_event(kind: JobKind, job_id: str, message: str, *, level: str = "info", type: str = "message",  # noqa: A002
              data: dict[str, Any] | None = None, step: int | None = None):
    """A new event row for job `job_id` (not added to any session)."""
    return kind.events(id=new_id(kind.event_prefix), created_at=int(now()), level=level, message=message, type=type,
                       data=data, step=step, **{kind.event_owner: job_id})


def submit(conn: Session | Connection, kind: JobKind, job_id: str, queue: JobQueue) -> None:
    """Commit the new `queued` row (created with `enqueued_at` set), then send its task: a task never
    runs before its row exists.

    If the broker refuses, the row is marked failed (`broker_unavailable`) and `Unavailable`
    raised, so no row stays `queued` with nothing to run it. (Were the row left queued, the
    reconciler would resend it once the broker is back; failing at once tells the caller now.)
    """
    table = kind.table
    conn.commit()
    try:
        queue.send(kind.queue, kind.task, job_id)
    except Exception as exc:  # noqa: BLE001 — any broker failure: the task cannot run
        log.exception("enqueue of %s failed", job_id)
        conn.execute(update(table).where(table.id == job_id, table.status == "queued").values(
            status="failed", finished_at=int(now()),
            error={"code": "broker_unavailable", "message": f"could not enqueue the {kind.noun}: {exc}", "param": None}))
        conn.commit()
        raise Unavailable(f"The job queue is unavailable; the {kind.noun} was marked failed",
                          code="broker_unavailable") from exc


def request_cancel(session: Session, kind: JobKind, job_id: str) -> None:
    """A queued job is cancelled at once; a running one is flagged and its worker stops at its next renewal."""
    table = kind.table
    status = session.scalar(select(table.status).where(table.id == job_id))
    if status in FINISHED:
        raise Conflict(f"{kind.noun.capitalize()} {job_id} has already {status}; it cannot be cancelled",
                       param=kind.id_param, code=f"{kind.short}_finished")
    moved = session.execute(update(table).where(table.id == job_id, table.status == "queued").values(
        status="cancelled", cancel_requested=True, finished_at=int(now()))).rowcount
    if moved:
        session.add(new_event(kind, job_id, f"{kind.noun.capitalize()} cancelled before it started"))
    else:
        session.execute(update(table).where(table.id == job_id).values(cancel_requested=True))
        session.add(new_event(kind, job_id, "Cancellation requested"))
    session.commit()


def _claimable(table, at: float):
    expired = or_(table.lease_expires_at.is_(None), table.lease_expires_at < at)
    return or_(table.status == "queued", and_(table.status == "running", expired))


def claim(db: Database, kind: JobKind, job_id: str, *, ttl_s: float, worker: str) -> "Lease | None":
    """Take job `job_id` for this worker: a `Lease`, or None when the job is not there to take.

    Not there to take: unknown, finished, or running under another worker's live lease (a
    duplicate delivery). A job flagged for cancellation before any worker ran it ends
    `cancelled` here.
    """
    table, at = kind.table, now()
    with db.sessions() as session:
        cancelled = session.execute(update(table).where(
            table.id == job_id, _claimable(table, at), table.cancel_requested.is_(True)).values(
            status="cancelled", finished_at=int(at), lease_token=None, lease_expires_at=None)).rowcount
        if cancelled:
            session.add(new_event(kind, job_id, f"{kind.noun.capitalize()} cancelled before it started"))
            session.commit()
            return None
        token = secrets.token_hex(16)
        row = session.execute(update(table).where(table.id == job_id, _claimable(table, at)).values(
            status="running", lease_token=token, lease_expires_at=at + ttl_s, attempts=table.attempts + 1,
            worker=worker[:255], started_at=func.coalesce(table.started_at, at)).returning(table.attempts)).one_or_none()
        if row is None:
            return None
        session.commit()
    return Lease(db, kind, job_id, token, row.attempts, ttl_s)


class Lease:
    """A worker's hold on one job (see the module docstring). `attempt` counts claims, from 1."""

    def __init__(self, db: Database, kind: JobKind, job_id: str, token: str, attempt: int, ttl_s: float):
        self.db, self.kind, self.job_id, self.token, self.attempt, self.ttl_s = db, kind, job_id, token, attempt, ttl_s
        self.cancel_requested = False
        self.lost = False

    @property
    def should_stop(self) -> bool:
        """Cancellation was requested, or the lease is gone: the work should stop at its next chance."""
        return self.cancel_requested or self.lost

    def _renew(self, session: Session) -> None:
        table = self.kind.table
        row = session.execute(update(table).where(
            table.id == self.job_id, table.lease_token == self.token, table.status == "running").values(
            lease_expires_at=now() + self.ttl_s).returning(table.cancel_requested)).one_or_none()
        if row is None:
            self.lost = True
            raise LeaseLost(f"{self.kind.noun} {self.job_id}: lease {self.token[:8]} (attempt {self.attempt}) is gone")
        self.cancel_requested = bool(row.cancel_requested)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose writes commit only while this lease holds (renewed as its first statement)."""
        with self.db.sessions() as session:
            self._renew(session)
            yield session
            session.commit()

    def renew(self) -> None:
        """Extend the lease and refresh `cancel_requested`; `LeaseLost` when it is gone."""
        with self.transaction():
            pass

    def record(self, events: list = (), **values) -> None:
        """Fenced: add event rows (from `new_event`) and set columns of the job row."""
        with self.transaction() as session:
            session.add_all(events)
            if values:
                self._update(session, **values)

    def _update(self, session: Session, **values) -> None:
        table = self.kind.table
        session.execute(update(table).where(table.id == self.job_id).values(**values))

    def _end(self, status: str, events: list, rows: list = (), **values) -> None:
        with self.transaction() as session:
            session.add_all([*rows, *events])
            self._update(session, status=status, finished_at=int(now()), lease_token=None, lease_expires_at=None,
                         **values)

    def succeed(self, *, rows: list = (), events: list = (), **values) -> None:
        """Fenced: insert `rows` (what the job produced), add `events`, move the job to `succeeded`."""
        self._end("succeeded", events, rows, **values)

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        self._end("failed", [self.event(f"{self.kind.noun.capitalize()} failed: {message}", level="error")],
                  error={"code": code, "message": message, "param": param})

    def finish_cancelled(self, message: str, **values) -> None:
        self._end("cancelled", [self.event(message)], **values)

    def event(self, message: str, **fields):
        return new_event(self.kind, self.job_id, message, **fields)

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew the lease every third of its time-to-live from a thread while the body runs.

        Long steps (a training step, a tensor being merged) then never let a live lease lapse;
        a lease found gone sets `lost` and the thread stops.
        """
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLost:
                    log.warning("%s %s: lease lost; this attempt stops", self.kind.noun, self.job_id)
                    return
                except Exception:  # noqa: BLE001 — a database blip: try again at the next beat
                    log.exception("%s %s: lease renewal failed", self.kind.noun, self.job_id)

        thread = threading.Thread(target=beat, name=f"lease-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def status_of(db: Database, kind: JobKind, job_id: str) -> str:
    with db.sessions() as session:
        return session.scalar(select(kind.table.status).where(kind.table.id == job_id)) or "missing"


def run(db: Database, kind: JobKind, job_id: str, work: Callable[[Lease], None], *, ttl_s: float,
        worker: str) -> str:
    """Claim `job_id` and run `work(lease)` to one end; returns the job's status afterwards.

    `work` ends the job with `lease.succeed(...)`, or raises: `Cancelled` (→ cancelled),
    `InputError` (→ failed with its message), `LeaseLost` (another attempt owns the job: nothing
    is written), anything else (→ failed, `internal_error`, details in this worker's log only).
    """
    lease = claim(db, kind, job_id, ttl_s=ttl_s, worker=worker)
    if lease is None:
        return status_of(db, kind, job_id)
    try:
        with lease.heartbeat():
            try:
                work(lease)
            except Cancelled as stop:
                lease.finish_cancelled(str(stop), **stop.values)
            except InputError as exc:
                lease.fail(exc.code or "invalid_request", str(exc), exc.param)
            except LeaseLost:
                raise
            except Exception as exc:  # noqa: BLE001 — a crash fails the job; a redelivery would only repeat it
                log.exception("%s %s crashed", kind.noun, job_id)
                lease.fail("internal_error", f"internal error ({type(exc).__name__}); the worker's log has the details")
    except LeaseLost:
        log.warning("%s %s: attempt %d lost its lease; another attempt owns the job", kind.noun, job_id, lease.attempt)
        return "lease_lost"
    return status_of(db, kind, job_id)
