"""The one settings class. Every process (CLI, API, worker) reads it through `get_settings()`.

Environment variables carry the `LORAMILL_` prefix, e.g. `LORAMILL_DATA_DIR`,
`LORAMILL_DATABASE_URL`, `LORAMILL_BROKER_URL`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.config import EngineConfig

_ENGINE = EngineConfig()


def default_data_dir() -> Path:
    """The per-user data directory (`~/.local/share/loramill` on Linux, as platformdirs says for each OS):
    the same for every command wherever it runs, so `tenant create` finds the database `serve` uses."""
    import platformdirs

    return Path(platformdirs.user_data_dir("loramill", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAMILL_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir,
                           description="All embedded state lives here; default: the per-user data directory.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker: redis://host:6379/0 or amqp://user:pass@host:5672/vhost; "
                                                     "unset = embedded.")
    result_backend: str | None = Field(None, description="Celery result backend (job state lives in the store); default: a "
                                                         "Redis broker, else none.")
    artifacts_dir: Path | None = Field(None, description="Artifact store root; default data_dir/artifacts.")
    dataset_cache_dir: Path | None = Field(None, description="Tokenized datasets, by content hash; default data_dir/cache/datasets.")
    admin_key: str | None = Field(None, description="Key that may register base models over HTTP.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload.")
    max_rank: int = Field(256, description="Largest LoRA rank a job or uploaded adapter may use.")
    visibility_timeout_s: int = Field(48 * 3600, description="Redis redelivery timeout; longer than any job.")
    tenant_cache_ttl_s: float = Field(10.0, description="How long an API process remembers a key's tenant; 0: off.")
    lease_ttl_s: float = Field(45.0, gt=0, description="A worker's claim on a job lapses this long after its last renewal.")
    reconcile_interval_s: float = Field(10.0, description="How often the API requeues stranded jobs; 0: never.")
    worker_devices: int = Field(1, ge=1, description="Devices (GPUs; processes on a CPU-only worker) one fine-tuning "
                                "job may train on. The API refuses a job asking more; set it alike on API and workers.")
    resend_after_s: float = Field(60.0, gt=0, description="A queued job whose broker message is missing this long is sent again.")
    # Bounds on every request (hostile input is normal input): each answered 4xx before the cost is paid.
    max_header_bytes: int = Field(32 * 1024, gt=0, description="Request line plus headers, in bytes (431 beyond).")
    max_json_bytes: int = Field(1024 * 1024, gt=0, description="A JSON request body, in bytes (413 beyond).")
    max_line_bytes: int = Field(4 * 1024 * 1024, gt=0, description="A dataset line, in bytes (the upload is refused beyond).")
    # Per-tenant quotas (0 turns one off): 429 with Retry-After, or 413 for storage.
    requests_per_minute: int = Field(1200, ge=0, description="API requests a tenant may make per minute, per API process.")
    max_active_jobs: int = Field(8, ge=0, description="Fine-tuning jobs and merges a tenant may have queued or running.")
    max_stored_bytes: int = Field(50 * 1024**3, ge=0, description="Bytes of files, adapters and merges a tenant may store.")
    idempotency_ttl_s: int = Field(24 * 3600, gt=0, description="How long an Idempotency-Key's first answer is kept.")
    # Inference (the control plane's side; the engines' own knobs are LORAMILL_ENGINE_*).
    engine_urls: dict[str, list[str]] = Field(default_factory=dict, description=(
        'Engines per base model, JSON: {"base": ["http://host:port", ...]} (or one URL as a string).'))
    engine_probe_interval_s: float = Field(2.0, ge=0, description="How often each API process asks engines' /health "
                                                                  "and re-reads the drained ones; 0: never.")
    engine_load_factor: float = Field(1.25, ge=1, description="An adapter's requests spill to its next engine past "
                                                               "this factor times the mean in-flight count.")
    engine_min_load: int = Field(8, ge=1, description="In-flight requests (from one API process) an engine always "
                                                      "takes before its adapters spill to the next engine.")
    api_workers: int = Field(1, ge=1, description="API processes `loramill serve` runs on its port (uvicorn workers).")
    embedded_engines: bool = Field(True, description="Start an engine per base model on first use when none is configured.")
    engine_start_timeout_s: float = Field(300.0, gt=0, description="How long an embedded engine may take to load its model.")
    engine_timeout_s: float = Field(600.0, gt=0, description="Longest wait for an engine's next bytes.")
    max_generation_tokens: int = Field(4096, gt=0, description="Largest max_tokens a request may ask for, and the most a request that omits it gets.")
    max_concurrent_generations: int = Field(16, ge=0, description="Generations a tenant may run at once, per API process.")
    host: str = "127.0.0.1"
    port: int = 8000
    # Client commands (`loramill jobs ...`): which server, and the tenant's key.
    api_url: str | None = Field(None, description="The API client commands talk to; default: http://HOST:PORT.")
    api_key: str | None = Field(None, description="A tenant's API key for client commands.")
    keep_checkpoints: int = Field(3, ge=0, description="Training checkpoints kept per run, the newest; 0: keep all.")
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

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _one_url_or_a_list(cls, value):
        """`{"base": "http://a"}` still works: one URL is a list of one. Each list non-empty, no URL twice."""
        if isinstance(value, dict):
            value = {base: [urls] if isinstance(urls, str) else urls for base, urls in value.items()}
            for base, urls in value.items():
                if isinstance(urls, list) and (not urls or len({str(u).rstrip("/") for u in urls}) != len(urls)):
                    raise ValueError(f"engine_urls[{base!r}] must list one or more distinct URLs")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """Resolved once, so a process that changes directory (or a child it starts) keeps the same data."""
        return value.expanduser().resolve()

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loramill.db').resolve()}"

    @property
    def resolved_dataset_cache_dir(self) -> Path:
        return (self.dataset_cache_dir or self.data_dir / "cache" / "datasets").resolve()

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once per process; tests call `get_settings.cache_clear()`."""
    return Settings()
