"""The job store's tables (SQLAlchemy 2 declarative).

Every row a tenant can see carries `tenant_id`; lookups go through `jobs.store.get_owned`, so
another tenant's id is indistinguishable from an unknown one.
Public ids are OpenAI-style strings (`file-…`, `ftjob-…`); `seq` is an ever-growing integer
that orders lists and backs `after=` cursors. Times are unix seconds, as OpenAI returns them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SeqType = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON(none_as_null=True), list[Any]: JSON(none_as_null=True)}


class Leased:
    """The columns of a job that workers claim (`jobs.lifecycle`).

    `lease_token` / `lease_expires_at`: who runs the job now and until when, renewed by the
    running worker; every write it makes is conditional on the token. `attempts` counts claims.
    `enqueued_at`: when its task was last sent to the broker (the reconciler resends lost ones).
    """

    status: Mapped[str] = mapped_column(String(24), index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    lease_token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Event:
    """One line of a job's event log: a message, or a metrics record (`type="metrics"`, `step` set)."""

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))  # "message" | "metrics"
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """Only the sha256 of a key is stored; `prefix` (first characters) helps a human tell keys apart."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # a revoked key never authenticates


class BaseModelRow(Base):
    """A base model registered by the admin; shared by every tenant."""

    __tablename__ = "base_models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    # {model key: checkpoint key} where transformers renames on load (`adapters.layouts`), worked out at
    # registration so validating an upload never has to import transformers; None: registered before that
    renames: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class FileRow(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # checked whenever it is downloaded
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


class JobRow(Leased, Base):
    """A fine-tuning job. `hyperparameters`/`lora` hold the resolved values the worker trains with."""

    __tablename__ = "fine_tuning_jobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    hyperparameters: Mapped[dict[str, Any]]
    lora: Mapped[dict[str, Any]]
    method: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)  # artifact key
    result_files: Mapped[list[Any]]
    created_at: Mapped[int] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class JobEventRow(Event, Base):
    __tablename__ = "fine_tuning_job_events"
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)


class CheckpointRow(Base):
    __tablename__ = "fine_tuning_job_checkpoints"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


class AdapterRow(Base):
    """A PEFT adapter: uploaded, or the product of a fine-tuning job (`job_id`, `fine_tuned_model`)."""

    __tablename__ = "adapters"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    base_model: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[Any]]
    bytes: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # [{name, bytes, sha256}]
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


class MergeRow(Leased, Base):
    """A merge job. `request` holds the resolved merge options and adapter refs; `files` the manifest's file list."""

    __tablename__ = "merges"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(64))
    request: Mapped[dict[str, Any]]
    files: Mapped[list[Any]]
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # of its files, once it succeeded
    storage_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class MergeEventRow(Event, Base):
    __tablename__ = "merge_events"
    merge_id: Mapped[str] = mapped_column(ForeignKey("merges.id", ondelete="CASCADE"), index=True)


class IdempotencyKeyRow(Base):
    """The first answer to a POST sent with an `Idempotency-Key`, replayed to its retries.

    `fingerprint` is the sha256 of method, path and body: a retry must send the same request.
    `status` is None while the first request is still running.
    """

    __tablename__ = "idempotency_keys"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class EngineDrainRow(Base):
    """An engine (by URL) that API processes send no new requests to (`loramill engines drain`)."""

    __tablename__ = "engine_drains"
    url: Mapped[str] = mapped_column(String(2048), primary_key=True)
    drained_at: Mapped[int] = mapped_column(BigInteger)
