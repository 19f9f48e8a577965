"""Job store operations shared by the API and the workers.

Status moves are conditional updates (`UPDATE … WHERE status IN (…)`), so a cancel racing a
worker's start, or a redelivered task racing nothing at all, ends in exactly one state.

Statements on the job-creation path are built once, with bind parameters: SQLAlchemy then
skips building the statement and its cache key on every call (half the CPU of a lookup).
"""

from __future__ import annotations

import itertools
import time
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, inspect, insert, select, update
from sqlalchemy.engine import Row as ResultRow
from sqlalchemy.orm import Session

from service.errors import APIError, not_found
from service.ids import new_id
from service.tables import AdapterRow, BaseModelRow, JobEventRow, JobRow, MergeRow

FINISHED = ("succeeded", "failed", "cancelled")
PENDING = ("validating_files", "queued")

Row = TypeVar("Row")


def now() -> int:
    return int(time.time())


def get_owned(session: Session, table: type[Row], id: str, tenant_id: str, kind: str, param: str = "id") -> Row:  # noqa: A002
    """The tenant's row with public id `id`; 404 for unknown ids and for other tenants' ids alike."""
    row = session.scalar(select(table).where(table.id == id, table.tenant_id == tenant_id))
    if row is None:
        raise not_found(kind, id, param)
    return row


_BASE_MODEL_BY_NAME = select(BaseModelRow.name, BaseModelRow.path).where(BaseModelRow.name == bindparam("name"))


def base_model(db: Session | Connection, name: str, param: str = "model") -> ResultRow:
    """The registered base model `name` as a (name, path) row; 404 when there is none."""
    row = db.execute(_BASE_MODEL_BY_NAME, {"name": name}).one_or_none() if isinstance(name, str) else None
    if row is None:
        raise APIError(404, f"The model {name!r} does not exist (register it with `loramill model add`)",
                       param=param, code="model_not_found")
    return row


def page(session: Session, query, table, *, after: str | None, limit: int, scope) -> tuple[list, bool]:
    """Newest-first page of `query` after the row with public id `after` (same scope); returns (rows, has_more)."""
    if after is not None:
        cursor = session.scalar(select(table.seq).where(table.id == after, scope))
        if cursor is None:
            raise APIError(400, f"after: no such id {after!r}", param="after", code="invalid_cursor")
        query = query.where(table.seq < cursor)
    rows = list(session.scalars(query.order_by(table.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def job_event(job_id: str, message: str, *, level: str = "info", type: str = "message",  # noqa: A002
              data: dict[str, Any] | None = None) -> JobEventRow:
    return JobEventRow(id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, message=message, type=type,
                       data=data)


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",  # noqa: A002
              data: dict[str, Any] | None = None) -> None:
    session.add(job_event(job_id, message, level=level, type=type, data=data))


@cache
def _column_names(table: type) -> tuple[tuple[str, str], ...]:
    """(attribute, column) name pairs of a mapped class (they differ where a column is named like a Python builtin)."""
    return tuple((attr.key, attr.columns[0].name) for attr in inspect(table).column_attrs)


@cache
def _insert_into(table: type):
    return insert(table.__table__)


def insert_new(session: Session | Connection, *rows: Any) -> None:
    """INSERT new rows with Core statements (one per table, in the order given), in the open transaction.

    For rows the request will not read back: the ORM's flush (unit-of-work sort, `RETURNING seq`,
    identity map) cost ~1 ms of CPU per created job. Attributes never set are left to the
    columns' defaults. The rows stay transient: the session does not track them.
    """
    for table, group in itertools.groupby(rows, type):
        values = [{column: row.__dict__[attr] for attr, column in _column_names(table) if attr in row.__dict__}
                  for row in group]
        session.execute(_insert_into(table), values)


def move(session: Session | Connection, table, id: str, from_: tuple[str, ...], to: str,  # noqa: A002
         **values) -> bool:
    """Set `status=to` (and `values`) iff the row's status is in `from_`; True when it moved. Not committed."""
    if to in FINISHED:
        values.setdefault("finished_at", now())
    result = session.execute(update(table).where(table.id == id, table.status.in_(from_)).values(status=to, **values))
    return result.rowcount == 1


def request_cancel(session: Session, job: JobRow) -> None:
    """Pending jobs are cancelled at once; a running one is flagged and its worker stops within ~1 s."""
    if job.status in FINISHED:
        raise APIError(409, f"Job {job.id} has already {job.status}; it cannot be cancelled", param="fine_tuning_job_id",
                       code="job_finished")
    if move(session, JobRow, job.id, PENDING, "cancelled", cancel_requested=True):
        add_event(session, job.id, "Job cancelled before it started")
    else:
        session.execute(update(JobRow).where(JobRow.id == job.id).values(cancel_requested=True))
        add_event(session, job.id, "Cancellation requested")
    session.commit()
    session.refresh(job)


def adapter_by_ref(session: Session, ref: str, tenant_id: str, param: str) -> AdapterRow:
    """An adapter named by its id or by the fine-tuned model name of the job that made it."""
    query = select(AdapterRow).where(AdapterRow.tenant_id == tenant_id)
    query = query.where(AdapterRow.fine_tuned_model == ref) if ref.startswith("ft:") else query.where(AdapterRow.id == ref)
    row = session.scalar(query)
    if row is None:
        raise not_found("adapter", ref, param)
    return row


def active_counts(session: Session) -> dict[tuple[str, str], int]:
    """(kind, status) -> number of jobs; for the Prometheus gauges."""
    from sqlalchemy import func

    counts: dict[tuple[str, str], int] = {}
    for kind, table in (("fine_tuning", JobRow), ("merge", MergeRow)):
        for status, n in session.execute(select(table.status, func.count()).group_by(table.status)):
            counts[(kind, status)] = n
    return counts
