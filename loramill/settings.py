"""The one settings class. Every process (CLI, API, worker) reads it through `get_settings()`.

Environment variables carry the `LORAMILL_` prefix, e.g. `LORAMILL_DATA_DIR`,
`LORAMILL_DATABASE_URL`, `LORAMILL_BROKER_URL`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAMILL_", extra="ignore")

    data_dir: Path = Field(Path(".loramill"), description="All embedded state lives here.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset = embedded.")
    result_backend: str | None = Field(None, description="Celery result backend; default: the broker.")
    artifacts_dir: Path | None = Field(None, description="Artifact store root; default data_dir/artifacts.")
    dataset_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "loramill" / "datasets",
                                    description="Tokenized training datasets, cached by content; safe to delete.")
    admin_key: str | None = Field(None, description="Key that may register base models over HTTP.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload.")
    max_rank: int = Field(256, description="Largest LoRA rank a job or uploaded adapter may use.")
    visibility_timeout_s: int = Field(48 * 3600, description="Redis redelivery timeout; longer than any job.")
    tenant_cache_ttl_s: float = Field(10.0, description="How long an API process remembers a key's tenant; 0: off.")
    lease_ttl_s: float = Field(45.0, gt=0, description="A worker's claim on a job lapses this long after its last renewal.")
    reconcile_interval_s: float = Field(10.0, description="How often the API requeues stranded jobs; 0: never.")
    resend_after_s: float = Field(60.0, gt=0, description="A queued job whose broker message is missing this long is sent again.")
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loramill.db').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once per process; tests call `get_settings.cache_clear()`."""
    return Settings()
