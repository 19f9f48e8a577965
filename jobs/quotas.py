"""Per-tenant quotas on what the store holds for a tenant: active jobs and stored bytes.

Both are checked when something new is created, before any of its cost is paid. The job count
is taken after a write to the tenant's row, so two creations by one tenant cannot both see
room for one more (the write serialises them: a row lock on PostgreSQL, the write lock on SQLite).
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from jobs.errors import QuotaExceeded, StorageQuotaExceeded
from jobs.tables import AdapterRow, FileRow, JobRow, MergeRow, Tenant

ACTIVE = ("validating_files", "queued", "running")
RETRY_ACTIVE_S = 30


def check_active_jobs(conn: Session | Connection, tenant_id: str, limit: int) -> None:
    """Refuse a new job or merge when the tenant already has `limit` queued or running (0: no limit)."""
    if not limit:
        return
    conn.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
    active = sum(conn.execute(select(func.count()).select_from(table).where(
        table.tenant_id == tenant_id, table.status.in_(ACTIVE))).scalar_one() for table in (JobRow, MergeRow))
    if active >= limit:
        raise QuotaExceeded(f"Too many active jobs: the limit is {limit} fine-tuning jobs and merges queued or "
                            "running at once; wait for one to finish or cancel one", retry_after_s=RETRY_ACTIVE_S,
                            code="too_many_active_jobs")


def stored_bytes(conn: Session | Connection, tenant_id: str) -> int:
    total = 0
    for column, owner in ((FileRow.bytes, FileRow.tenant_id), (AdapterRow.bytes, AdapterRow.tenant_id),
                          (MergeRow.bytes, MergeRow.tenant_id)):
        total += conn.execute(select(func.coalesce(func.sum(column), 0)).where(owner == tenant_id)).scalar_one()
    return int(total)


def check_storage(conn: Session | Connection, tenant_id: str, limit: int, incoming: int) -> None:
    """Refuse storing `incoming` more bytes past the tenant's `limit` (0: no limit)."""
    if not limit:
        return
    held = stored_bytes(conn, tenant_id)
    if held + incoming > limit:
        raise StorageQuotaExceeded(f"Storage quota exceeded: the limit is {limit} bytes, {held} are in use; delete "
                                   "files, adapters or merges first", param="file")
