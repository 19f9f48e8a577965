"""Job store lookups shared by the API and the workers; they raise domain errors, never HTTP ones.

Statements on the job-creation path are built once, with bind parameters: SQLAlchemy then
skips building the statement and its cache key on every call (half the CPU of a lookup).
Status moves and events belong to `jobs.lifecycle`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, inspect, insert, select
from sqlalchemy.engine import Row as ResultRow
from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.errors import NotFound
from jobs.tables import AdapterRow, BaseModelRow

FINISHED = ("succeeded", "failed", "cancelled")

Row = TypeVar("Row")


def now() -> int:
    return int(time.time())


def findable(key: object) -> bool:
    """Whether `key` (an id or name from a request) could name a stored row: a string without NUL.

    Nothing stored holds a NUL (ids are made here, names are checked), and PostgreSQL refuses one
    even in a query's parameters (an error, where SQLite just finds nothing): such a key is
    answered as unknown without asking the database, the same on both.
    """
    return isinstance(key, str) and "\x00" not in key


def get_owned(session: Session, table: type[Row], id: str, tenant_id: str, kind: str, param: str = "id") -> Row:  # noqa: A002
    """The tenant's row with public id `id`; `NotFound` for unknown ids and for other tenants' ids alike."""
    row = session.scalar(select(table).where(table.id == id, table.tenant_id == tenant_id)) if findable(id) else None
    if row is None:
        raise NotFound.of(kind, id, param)
    return row


_BASE_MODEL_BY_NAME = select(BaseModelRow.name, BaseModelRow.path).where(BaseModelRow.name == bindparam("name"))


def base_model(db: Session | Connection, name: str, param: str = "model") -> ResultRow:
    """The registered base model `name` as a (name, path) row; `NotFound` (`model_not_found`) when there is none."""
    row = db.execute(_BASE_MODEL_BY_NAME, {"name": name}).one_or_none() if findable(name) else None
    if row is None:
        raise NotFound(f"The model {name!r} does not exist (register it with `loramill model add`)", param=param,
                       code="model_not_found")
    return row


def page(session: Session, query, table, *, after: str | None, limit: int, scope) -> tuple[list, bool]:
    """Newest-first page of `query` after the row with public id `after` (same scope); returns (rows, has_more)."""
    if after is not None:
        cursor = session.scalar(select(table.seq).where(table.id == after, scope)) if findable(after) else None
        if cursor is None:
            raise InputError(f"after: no such id {after!r}", param="after", code="invalid_cursor")
        query = query.where(table.seq < cursor)
    rows = list(session.scalars(query.order_by(table.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


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
    identity map) would cost more than the INSERTs. Attributes never set are left to the
    columns' defaults. The rows stay transient: the session does not track them.
    """
    for table, group in itertools.groupby(rows, type):
        values = [{column: row.__dict__[attr] for attr, column in _column_names(table) if attr in row.__dict__}
                  for row in group]
        session.execute(_insert_into(table), values)


def adapter_by_ref(session: Session, ref: str, tenant_id: str, param: str) -> AdapterRow:
    """An adapter named by its id or by the fine-tuned model name of the job that made it."""
    query = select(AdapterRow).where(AdapterRow.tenant_id == tenant_id)
    query = query.where(AdapterRow.fine_tuned_model == ref) if ref.startswith("ft:") else query.where(AdapterRow.id == ref)
    row = session.scalar(query) if findable(ref) else None
    if row is None:
        raise NotFound.of("adapter", ref, param)
    return row



@dataclass(frozen=True)
class ModelRef:
    """What a request's `model` names: a base model, or a tenant's adapter on it (`adapter` None for the base)."""

    name: str  # as the caller wrote it
    base: str
    base_path: str
    adapter: AdapterRow | None


def resolve_model(session: Session, tenant_id: str, name: str) -> ModelRef:
    """A base model's name, or one of the tenant's fine-tuned model names or adapter ids.

    Another tenant's model is `NotFound` (`model_not_found`) exactly like an unknown one.
    """
    base = None if name.startswith("ft:") or not findable(name) else session.get(BaseModelRow, name)
    if base is not None:
        return ModelRef(name, base.name, base.path, None)
    owned = select(AdapterRow).where(AdapterRow.tenant_id == tenant_id)
    adapter = session.scalar(owned.where(AdapterRow.fine_tuned_model == name if name.startswith("ft:")
                                         else AdapterRow.id == name)) if findable(name) else None
    base = session.get(BaseModelRow, adapter.base_model) if adapter is not None else None
    if base is None:
        raise NotFound(f"The model {name!r} does not exist or you do not have access to it", param="model",
                       code="model_not_found")
    return ModelRef(name, base.name, base.path, adapter)
