"""Tenants and their API keys.

A key is `lm-` + 43 url-safe random characters (256 bits). Only its sha256 is stored: a key this
random needs no slow hash, and lookup by digest is one indexed read (which the API caches for a
few seconds per process, `LORAMILL_TENANT_CACHE_TTL_S`). A tenant may hold several keys, so a key
is rotated by creating the new one, moving clients over, then revoking the old one; a revoked
key stops working in every API process within that cache's lifetime.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.errors import NotFound
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
    tenant = Tenant(id=new_id("tenant"), name=name, created_at=int(time.time()))
    session.add(tenant)
    session.flush()
    _, key = _add_key(session, tenant)
    session.commit()
    return tenant, key


def _add_key(session: Session, tenant: Tenant) -> tuple[ApiKey, str]:
    key = "lm-" + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_sha256=key_digest(key), prefix=key[:10],
                 created_at=int(time.time()))
    session.add(row)
    return row, key


def _tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound.of("tenant", name, "name")
    return tenant


def create_key(session: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """A new key for an existing tenant (its other keys keep working); returns (row, key)."""
    row, key = _add_key(session, _tenant(session, tenant_name))
    session.commit()
    return row, key


def list_keys(session: Session, tenant_name: str) -> list[ApiKey]:
    tenant = _tenant(session, tenant_name)
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke key `key_id` (its id, `key-...`); revoking twice is harmless."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound.of("API key", key_id, "key_id")
    if row.revoked_at is None:
        row.revoked_at = int(time.time())
        session.commit()
    return row


def tenant_for_digest(session: Session, digest: str) -> TenantRef | None:
    """The tenant owning the live key with sha256 `digest`, or None (two columns, no ORM object)."""
    row = session.execute(
        select(Tenant.id, Tenant.name, ApiKey.key_sha256).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None or not hmac.compare_digest(row.key_sha256, digest):
        return None
    return TenantRef(row.id, row.name)
