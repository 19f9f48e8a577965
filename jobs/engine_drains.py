"""Engines drained for a restart: kept in the job store, so every API replica reads the same set.

An operator drains an engine (`loramill engines drain URL`), waits for its running requests to
finish (its `/metrics`, or simply the longest generation), restarts it, and resumes it
(`loramill engines resume URL`). API processes re-read the set every
`LORAMILL_ENGINE_PROBE_INTERVAL_S` and send a drained engine no new request.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.store import now
from jobs.tables import EngineDrainRow

MAX_URL_CHARS = EngineDrainRow.__table__.c.url.type.length


def normalize_url(url: str) -> str:
    """An engine's URL as routing names it: no trailing slash."""
    return url.strip().rstrip("/")


def drain(session: Session, url: str) -> EngineDrainRow:
    url = normalize_url(url)
    if not url.startswith(("http://", "https://")) or len(url) > MAX_URL_CHARS:
        raise InputError(f"an engine URL is http(s)://host:port, at most {MAX_URL_CHARS} characters", param="url")
    row = session.get(EngineDrainRow, url)
    if row is None:
        row = EngineDrainRow(url=url, drained_at=now())
        session.add(row)
        session.commit()
    return row


def resume(session: Session, url: str) -> bool:
    """Take `url` off the drained set; False when it was not on it."""
    result = session.execute(delete(EngineDrainRow).where(EngineDrainRow.url == normalize_url(url)))
    session.commit()
    return result.rowcount > 0


def drained(session: Session) -> set[str]:
    return set(session.scalars(select(EngineDrainRow.url)))
