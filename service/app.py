"""`create_app(settings)`: the FastAPI control plane.

`uvicorn --factory service.app:create_app` builds it from the process's settings. It migrates the
job store to the newest schema, opens the artifact store and the broker connection, and mounts
one router per resource. Every route declares its request and response schemas and its errors
(`service.schemas`, `service.responses`); `/openapi.json` documents them, with the bearer key the
`/v1/` routes need. While it serves, a reconciler thread requeues stranded jobs
(`jobs.reconciler`; every API replica runs one, and they agree through the store), and a probe task
watches the inference engines (`service.engines`).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from jobs.artifacts import LocalArtifactStore
from jobs.db import database, migrate
from jobs.engine_drains import drained
from jobs.queue import JobQueue
from jobs.reconciler import Reconciler
from loramill.settings import Settings, get_settings
from service.deps import Services
from service.embedded import EmbeddedEngines, child_env, worker_ready_probe
from service.engines import Engines, Generations
from service.errors import install_handlers
from service.gate import Gate, authenticated
from service.idempotency import Idempotency
from service.metrics import TimingMiddleware, metrics_registry
from service.routers import adapters, console, files, fine_tuning, health, inference, merges, models
from service.tenant_cache import TenantCache


def build_services(settings: Settings) -> Services:
    url = settings.resolved_database_url
    migrate(url)
    artifacts = LocalArtifactStore(settings.resolved_artifacts_dir)
    artifacts.empty_trash()  # what deletions interrupted by a crash left aside
    embedded = EmbeddedEngines(settings.data_dir, child_env(settings.data_dir),
                               start_timeout_s=settings.engine_start_timeout_s) if settings.embedded_engines else None
    db = database(url)

    def read_drained() -> set[str]:
        with db.sessions() as session:
            return drained(session)

    engines = Engines(settings.engine_urls, embedded, timeout_s=settings.engine_timeout_s,
                      probe_interval_s=settings.engine_probe_interval_s, load_factor=settings.engine_load_factor,
                      min_load=settings.engine_min_load, drained=read_drained)
    return Services(settings=settings, db=db, artifacts=artifacts, queue=JobQueue(settings),
                    tenants=TenantCache(settings.tenant_cache_ttl_s), engines=engines,
                    generations=Generations(settings.max_concurrent_generations))


def reconciler_for(services: Services) -> Reconciler:
    settings = services.settings
    return Reconciler(services.db, services.queue, interval_s=settings.reconcile_interval_s,
                      resend_after_s=settings.resend_after_s, idempotency_ttl_s=settings.idempotency_ttl_s)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the server runs: the reconciler thread, and startup objects frozen out of the collector's sight.

    The objects of a started API (modules, SQLAlchemy mappers, FastAPI routes) live as long as
    the process, yet every full collection walked them all, a pause in the middle of serving.
    Frozen (after one collection, so no garbage is kept), they are never traversed again. Runs
    only in a serving process (the lifespan startup), not for every app a test builds.
    """
    services: Services = app.state.services
    reconciler = reconciler_for(services)
    if services.settings.reconcile_interval_s > 0:
        reconciler.start()
    services.engines.start()
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        reconciler.stop()
        await services.engines.aclose()


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, with the bearer key that `service.gate` asks of the `/v1/` ones."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "A tenant's API key (`loramill tenant create`); the admin key for POST /v1/models"}}
        for path, operations in schema["paths"].items():
            if authenticated(path):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="loramill", version="0.1.0", lifespan=lifespan,
                  description="LoRA fine-tuning, merging and serving: OpenAI's files, fine-tuning and completions "
                              "APIs, and loramill's adapters and merges. Every error is OpenAI's error object.")
    app.openapi = lambda: openapi_schema(app)
    app.state.services = build_services(settings)
    app.state.metrics_registry, http = metrics_registry(app.state.services)
    app.add_middleware(Idempotency, services=app.state.services)  # added first: runs after the gate
    app.add_middleware(Gate, services=app.state.services)
    app.add_middleware(TimingMiddleware, histogram=http)
    install_handlers(app)
    for module in (files, fine_tuning, adapters, merges, models, inference, health, console):
        app.include_router(module.router)
    return app


def create_served_app() -> FastAPI:
    """One process of `loramill serve --workers N` (uvicorn's app factory): the app from this process's
    settings; with the embedded worker (no broker), `/readyz` checks it through its ready file."""
    settings = get_settings()
    app = create_app(settings)
    if not settings.broker_url:
        app.state.services.probes["worker"] = worker_ready_probe(settings.data_dir)
    return app
