"""The one settings class. Every process (CLI, API, worker) reads it through `get_settings()`.

Environment variables carry the `LORAMILL_` prefix, e.g. `LORAMILL_DATA_DIR`,
`LORAMILL_DATABASE_URL`, `LORAMILL_BROKER_URL`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.config import EngineConfig

_ENGINE = EngineConfig()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAMILL_", extra="ignore")

    data_dir: Path = Field(Path(".loramill"), description="All embedded state lives here.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset = embedded.")
    result_backend: str | None = Field(None, description="Celery result backend; default: the broker.")
    artifacts_dir: Path | None = Field(None, description="Artifact store root; default data_dir/artifacts.")
    admin_key: str | None = Field(None, description="Key that may register base models over HTTP.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload.")
    max_rank: int = Field(256, description="Largest LoRA rank a job or uploaded adapter may use.")
    visibility_timeout_s: int = Field(48 * 3600, description="Redis redelivery timeout; longer than any job.")
    tenant_cache_ttl_s: float = Field(10.0, description="How long an API process remembers a key's tenant; 0: off.")
    host: str = "127.0.0.1"
    port: int = 8000
    # `loramill engine` (serving.config.EngineConfig holds the defaults and their meaning)
    engine_port: int = Field(8100, description="Port of `loramill engine` when --port is not given.")
    engine_max_loras: int = Field(_ENGINE.max_loras, description="Adapter slots on the device.")
    engine_max_cpu_loras: int = Field(_ENGINE.max_cpu_loras, description="Adapters kept converted in host memory.")
    engine_max_lora_rank: int = Field(_ENGINE.max_lora_rank, description="Largest adapter rank the engine serves.")
    engine_max_num_seqs: int = Field(_ENGINE.max_num_seqs, description="Requests decoded together (KV rows).")
    engine_max_num_batched_tokens: int = Field(_ENGINE.max_num_batched_tokens, description="Tokens per forward pass.")
    engine_max_model_len: int | None = Field(_ENGINE.max_model_len, description="Context length; default: the base's.")
    engine_max_waiting: int = Field(_ENGINE.max_waiting, description="Waiting requests before the engine answers 503.")
    engine_max_saved_module_bytes: int = Field(_ENGINE.max_saved_module_bytes,
                                               description="Memory for adapters' modules_to_save copies, all slots.")
    engine_dtype: str = Field(_ENGINE.dtype, description="auto | float32 | bfloat16 | float16.")
    engine_device: str | None = Field(_ENGINE.device, description="cuda, cuda:1, cpu; default: cuda if present.")
    engine_threads: int | None = Field(_ENGINE.threads, description="Torch CPU threads; default: torch's.")

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
