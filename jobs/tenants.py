"""Tenants and their API keys.

A key is `lm-` + 43 url-safe random characters (256 bits). Only its sha256 is stored: a key this
random needs no slow hash, and lookup by digest is one indexed read (which the API caches for a
few seconds per process).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.ids import new_id
from jobs.tables import ApiKey, Tenant

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class TenantRef:
    """A tenant as requests use it: its id (ownership checks) and name (`owned_by`)."""

    id: str
    name: str


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str, what: str, param: str = "name") -> str:
    """Names go into ids and paths: letters, digits, `_` and `-`, at most 64, never path-like."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(f"invalid {what} name {name!r}: use 1-64 letters, digits, '_' or '-'", param=param)
    return name


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """Create tenant `name` with one API key; returns (tenant, key). The key is not recoverable later."""
    check_name(name, "tenant")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise InputError(f"tenant {name!r} already exists", param="name")
    now = int(time.time())
    tenant = Tenant(id=new_id("tenant"), name=name, created_at=now)
    key = "lm-" + secrets.token_urlsafe(32)
    session.add(tenant)
    session.flush()
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_sha256=key_digest(key), prefix=key[:10], created_at=now))
    session.commit()
    return tenant, key


def tenant_for_digest(session: Session, digest: str) -> TenantRef | None:
    """The tenant owning the key with sha256 `digest`, or None (two columns, no ORM object)."""
    row = session.execute(
        select(Tenant.id, Tenant.name).join(ApiKey, ApiKey.tenant_id == Tenant.id).where(ApiKey.key_sha256 == digest)
    ).one_or_none()
    return TenantRef(row.id, row.name) if row is not None else None
