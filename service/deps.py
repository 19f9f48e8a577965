"""Typed FastAPI dependencies: the app's services, a database session, the calling tenant, the admin.

Use them as annotations: `def route(session: SessionDep, tenant: TenantDep) -> ...`.
Authentication is `Authorization: Bearer <key>`; a missing or unknown key answers 401.
Dependencies that touch no database are `async def`: FastAPI runs every sync dependency in the
thread pool, a hop each that costs more than the work. `current_tenant` is async too: a known
key is answered from the process's tenant cache, and only a miss goes to the thread pool.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from jobs.artifacts import ArtifactStore
from jobs.db import Database
from jobs.queue import JobQueue
from jobs.tenants import TenantRef, key_digest, tenant_for_digest
from loramill.settings import Settings
from service.errors import APIError
from service.tenant_cache import TenantCache


@dataclass(frozen=True)
class Services:
    """Everything a request may use, built once by `create_app`."""

    settings: Settings
    db: Database
    artifacts: ArtifactStore
    queue: JobQueue
    tenants: TenantCache
    # readiness checks beyond the database and the broker, by name: raise when not ready (`serve` adds "worker")
    probes: dict[str, Callable[[], None]] = field(default_factory=dict)


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def bearer_key(authorization: Annotated[str | None, Header()] = None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       type="invalid_request_error")
    return key.strip()


BearerDep = Annotated[str, Depends(bearer_key)]


def _lookup_tenant(db: Database, digest: str) -> TenantRef | None:
    with db.sessions() as session:
        return tenant_for_digest(session, digest)


async def current_tenant(key: BearerDep, services: ServicesDep) -> TenantRef:
    digest = key_digest(key)
    tenant = services.tenants.get(digest)
    if tenant is None:
        tenant = await run_in_threadpool(_lookup_tenant, services.db, digest)
        if tenant is None:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key", type="invalid_request_error")
        services.tenants.put(digest, tenant)
    return tenant


TenantDep = Annotated[TenantRef, Depends(current_tenant)]


async def require_admin(key: BearerDep, services: ServicesDep) -> None:
    if not services.settings.admin_key:
        raise APIError(403, "Model registration over HTTP is disabled: no LORAMILL_ADMIN_KEY is configured",
                       code="admin_disabled")
    if not hmac.compare_digest(key.encode(), services.settings.admin_key.encode()):
        raise APIError(401, "Incorrect admin key provided", code="invalid_api_key", type="invalid_request_error")


AdminDep = Annotated[None, Depends(require_admin)]
