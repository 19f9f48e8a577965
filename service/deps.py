"""Typed FastAPI dependencies: the app's services, a database session, the calling tenant, the admin.

Use them as annotations: `def route(session: SessionDep, tenant: TenantDep) -> ...`.
Authentication happened before the request body was read (`service.gate`); these dependencies
only read its result. Dependencies that touch no database are `async def`: FastAPI runs every
sync dependency in the thread pool, a hop each that costs more than the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from jobs.artifacts import ArtifactStore
from jobs.db import Database
from jobs.queue import JobQueue
from jobs.tenants import TenantRef
from loramill.settings import Settings
from service.engines import Engines, Generations
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
    engines: Engines
    generations: Generations
    # readiness checks beyond the database and the broker, by name: raise when not ready (`serve` adds "worker")
    probes: dict[str, Callable[[], None]] = field(default_factory=dict)


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _caller(request: Request):
    """Who sent the request, as `service.gate.Gate` authenticated it before the body was read."""
    return request.state.caller


async def current_tenant(request: Request) -> TenantRef:
    caller = _caller(request)
    if caller.tenant is None:  # the admin key: it registers base models, it is no tenant
        raise APIError(401, "This route needs a tenant's API key, not the admin key", code="invalid_api_key",
                       type="invalid_request_error")
    return caller.tenant


TenantDep = Annotated[TenantRef, Depends(current_tenant)]


async def require_admin(request: Request, services: ServicesDep) -> None:
    if not services.settings.admin_key:
        raise APIError(403, "Model registration over HTTP is disabled: no LORAMILL_ADMIN_KEY is configured",
                       code="admin_disabled")
    if not _caller(request).admin:
        raise APIError(401, "Incorrect admin key provided", code="invalid_api_key", type="invalid_request_error")


AdminDep = Annotated[None, Depends(require_admin)]
