"""Idempotency keys: a POST retried with the same `Idempotency-Key` gets the first answer, and creates nothing new.

A key belongs to a tenant. `begin` claims it with an INSERT (the primary key makes two
concurrent first requests race, and one wins); `finish` stores the answer; `abandon` frees the
key when the first request failed on the server's side, so a retry runs again. A key's record
lives `ttl_s` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from jobs.db import Database
from jobs.tables import IdempotencyKeyRow

IN_PROGRESS_STALE_S = 600  # a first request still unanswered after this long died with its process


@dataclass(frozen=True)
class Replay:
    """What the first request with this key answered (`status` None: it is still running)."""

    fingerprint: str
    status: int | None
    response: dict | None


def begin(db: Database, tenant_id: str, key: str, *, ttl_s: float) -> Replay | None:
    """Claim `key` for a first request (None), or what an earlier request with it left (`Replay`)."""
    now = time.time()
    with db.sessions() as session:
        session.execute(delete(IdempotencyKeyRow).where(
            IdempotencyKeyRow.tenant_id == tenant_id, IdempotencyKeyRow.key == key,
            (IdempotencyKeyRow.created_at < now - ttl_s)
            | (IdempotencyKeyRow.status.is_(None) & (IdempotencyKeyRow.created_at < now - IN_PROGRESS_STALE_S))))
        session.add(IdempotencyKeyRow(tenant_id=tenant_id, key=key, fingerprint="", status=None, created_at=now))
        try:
            session.commit()
            return None
        except IntegrityError:
            session.rollback()
        row = session.scalar(select(IdempotencyKeyRow).where(IdempotencyKeyRow.tenant_id == tenant_id,
                                                             IdempotencyKeyRow.key == key))
        return Replay(row.fingerprint, row.status, row.response) if row is not None else Replay("", None, None)


def finish(db: Database, tenant_id: str, key: str, fingerprint: str, status: int, response: dict) -> None:
    with db.sessions() as session:
        session.execute(update(IdempotencyKeyRow).where(
            IdempotencyKeyRow.tenant_id == tenant_id, IdempotencyKeyRow.key == key).values(
            fingerprint=fingerprint, status=status, response=response))
        session.commit()


def abandon(db: Database, tenant_id: str, key: str) -> None:
    with db.sessions() as session:
        session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.tenant_id == tenant_id,
                                                        IdempotencyKeyRow.key == key))
        session.commit()


def purge_expired(db: Database, ttl_s: float) -> int:
    with db.sessions() as session:
        gone = session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.created_at < time.time() - ttl_s))
        session.commit()
        return gone.rowcount
