"""What a worker process needs, built once from its settings on its first task."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache

from jobs.artifacts import ArtifactStore, LocalArtifactStore
from jobs.db import Database, database, migrate
from loramill.settings import Settings, get_settings


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    db: Database
    artifacts: ArtifactStore
    name: str  # who holds a lease: host and process, for the job row and the logs


def context_for(settings: Settings) -> WorkerContext:
    url = settings.resolved_database_url
    migrate(url)
    return WorkerContext(settings, database(url), LocalArtifactStore(settings.resolved_artifacts_dir),
                         f"{socket.gethostname()}:{os.getpid()}")


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    return context_for(get_settings())
