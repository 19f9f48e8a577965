"""What a worker process needs, built once from its settings on its first task."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from loramill.settings import Settings, get_settings
from service.artifacts import ArtifactStore, LocalArtifactStore
from service.db import Database, database, migrate


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    db: Database
    artifacts: ArtifactStore


def context_for(settings: Settings) -> WorkerContext:
    url = settings.resolved_database_url
    migrate(url)
    return WorkerContext(settings, database(url), LocalArtifactStore(settings.resolved_artifacts_dir))


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    return context_for(get_settings())
