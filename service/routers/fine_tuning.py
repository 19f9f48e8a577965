"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API, training LoRA adapters.

Create: every reference and option is checked first (unknown or other tenants' files and models,
ranks above `max_rank`, target modules the base lacks → 4xx, nothing stored). Datasets were
validated line by line when uploaded, so file validation (`validating_files`) completes within
the request: the job row is committed as `queued`, and only then is its task enqueued.

Create is the hot route (design.md sets its latency target). Its whole unit of work (two lookups, two INSERTs, one commit, the enqueue) runs in one thread-pool hop
on a Core connection of its own: the request-scoped `SessionDep` would cost two more hops
(FastAPI enters and leaves a sync generator dependency in the pool), and nothing here needs
what an ORM session adds to every statement (identity map, ORM compilation, flush).

"auto" hyperparameters are chosen by the worker once it has read the dataset
(`adapters.auto_hyperparameters`: from the number of examples, their supervised tokens and the
base model's width); the learning rate is 2e-4 × the multiplier.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, Row, bindparam, select

from adapters.auto_hyperparameters import BASE_LEARNING_RATE
from jobs.base_models import check_targets, context_length
from jobs.errors import NotFound
from jobs.ids import new_id
from jobs.lifecycle import FINE_TUNING, new_event, request_cancel, submit
from jobs.quotas import check_active_jobs
from jobs.store import base_model, findable, get_owned, insert_new, now, page
from jobs.tables import CheckpointRow, FileRow, JobEventRow, JobRow
from service.deps import Services, ServicesDep, SessionDep, TenantDep
from service.errors import APIError
from service.idempotency import OPENAPI_PARAMETER as IDEMPOTENCY_KEY
from service.objects import checkpoint_object, event_object, job_object, listing
from service.responses import CheckpointList, FineTuningJob, FineTuningJobList, JobEventList, errors
from service.schemas import FineTuningJobCreate, Hyperparameters, LoraOptions

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=errors(400, 401, 429))
def resolve_hyperparameters(hp: Hyperparameters) -> dict:
    """The job's hyperparameters as stored: "auto" stays "auto" until the worker has read the dataset and
    chosen (`adapters.auto_hyperparameters`; the job object then shows the values chosen, as OpenAI's does)."""
    values = hp.model_dump()
    if values["learning_rate_multiplier"] != "auto":
        values["learning_rate"] = BASE_LEARNING_RATE * values["learning_rate_multiplier"]
    return values


def _hyperparameters(body: FineTuningJobCreate) -> Hyperparameters:
    nested = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if nested is not None and body.hyperparameters is not None:
        raise APIError(400, "Give hyperparameters either at the top level or in method.supervised, not both",
                       param="hyperparameters", code="invalid_value")
    return nested or body.hyperparameters or Hyperparameters()


def _lora(body: FineTuningJobCreate, base_path: str, max_rank: int) -> dict:
    lora = body.lora or LoraOptions()
    if lora.rank > max_rank:
        raise APIError(400, f"lora.rank {lora.rank} is above the maximum rank {max_rank}", param="lora.rank",
                       code="rank_too_large")
    targets = lora.target_modules
    check_targets(base_path, targets if isinstance(targets, str) else tuple(targets))
    values = lora.model_dump()
    values["alpha"] = values["alpha"] if values["alpha"] is not None else 2 * lora.rank
    return values


def _check_context(max_seq_len: int, base) -> None:
    limit = context_length(base.path)
    if limit is not None and max_seq_len > limit:
        raise APIError(400, f"hyperparameters.max_seq_len {max_seq_len} is longer than the {limit} tokens base model "
                       f"{base.name!r} takes", param="hyperparameters.max_seq_len", code="invalid_value")


def _check_devices(devices: int, sharding: str, offered: int) -> None:
    if devices > offered:
        raise APIError(400, f"hyperparameters.devices {devices} is more than the {offered} device"
                       f"{'s' if offered > 1 else ''} a training worker offers", param="hyperparameters.devices",
                       code="invalid_value")
    if sharding != "auto" and devices == 1:  # as `TrainingConfig.validate` says it, before anything is stored
        raise APIError(400, f"hyperparameters.sharding {sharding!r} needs hyperparameters.devices > 1: one process "
                       "holds the whole base (leave sharding 'auto')", param="hyperparameters.sharding",
                       code="invalid_value")


_TENANT_FILES = select(FileRow.id, FileRow.purpose, FileRow.records).where(
    FileRow.id.in_(bindparam("ids", expanding=True)), FileRow.tenant_id == bindparam("tenant_id"))


def _datasets(conn: Connection, tenant_id: str, body: FineTuningJobCreate) -> tuple[Row, Row | None]:
    """The tenant's training and validation files, in one query; 404 for unknown and other tenants' ids alike."""
    wanted = {"training_file": body.training_file, "validation_file": body.validation_file}
    ids = [file_id for file_id in wanted.values() if findable(file_id)]
    found = {row.id: row for row in conn.execute(_TENANT_FILES, {"ids": ids, "tenant_id": tenant_id})}
    for param, file_id in wanted.items():
        if file_id is None:
            continue
        if file_id not in found:
            raise NotFound.of("file", file_id, param)
        if found[file_id].purpose != "fine-tune":
            raise APIError(400, f"{param}: file {file_id} has purpose {found[file_id].purpose!r}, not 'fine-tune'",
                           param=param, code="invalid_file_purpose")
    return found[body.training_file], found.get(body.validation_file)


@router.post("", response_model=FineTuningJob, responses=errors(404, 413, 422, 503),
             openapi_extra={"parameters": [IDEMPOTENCY_KEY]})
async def create_job(body: FineTuningJobCreate, services: ServicesDep, tenant: TenantDep) -> dict:
    return await run_in_threadpool(_create_job, body, services, tenant.id)


def _create_job(body: FineTuningJobCreate, services: Services, tenant_id: str) -> dict:
    with services.db.engine.connect() as conn:
        base = base_model(conn, body.model)
        train_file, val_file = _datasets(conn, tenant_id, body)
        check_active_jobs(conn, tenant_id, services.settings.max_active_jobs)
        hp = resolve_hyperparameters(_hyperparameters(body))
        _check_context(hp["max_seq_len"], base)
        _check_devices(hp["devices"], hp["sharding"], services.settings.worker_devices)
        lora = _lora(body, base.path, services.settings.max_rank)

        job = JobRow(id=new_id("ftjob"), tenant_id=tenant_id, model=base.name, training_file=train_file.id,
                     validation_file=val_file.id if val_file else None, hyperparameters=hp, lora=lora,
                     method={"type": "supervised"}, metadata_=body.metadata, suffix=body.suffix,
                     seed=body.seed if body.seed is not None else 0, status="queued", cancel_requested=False,
                     result_files=[], created_at=now(), enqueued_at=time.time())
        insert_new(conn, job, new_event(FINE_TUNING, job.id, f"Validating training file: {train_file.id}"),
                   new_event(FINE_TUNING, job.id, "Files validated, moving job to queued state"))
        submit(conn, FINE_TUNING, job.id, services.queue)
        return job_object(job)


@router.get("", response_model=FineTuningJobList)
def list_jobs(session: SessionDep, tenant: TenantDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    scope = JobRow.tenant_id == tenant.id
    rows, more = page(session, select(JobRow).where(scope), JobRow, after=after, limit=limit, scope=scope)
    return listing([job_object(r) for r in rows], more)


@router.get("/{job_id}", response_model=FineTuningJob, responses=errors(404))
def retrieve_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    return job_object(get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id"))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=errors(404, 409))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    job = get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id")
    request_cancel(session, FINE_TUNING, job.id)
    session.refresh(job)
    return job_object(job)


@router.get("/{job_id}/events", response_model=JobEventList, responses=errors(404))
def list_events(job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
    get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id")
    scope = JobEventRow.job_id == job_id
    rows, more = page(session, select(JobEventRow).where(scope), JobEventRow, after=after, limit=limit, scope=scope)
    return listing([event_object(r) for r in rows], more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=errors(404))
def list_checkpoints(job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict:
    job = get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id")
    scope = CheckpointRow.job_id == job_id
    rows, more = page(session, select(CheckpointRow).where(scope), CheckpointRow, after=after, limit=limit, scope=scope)
    return listing([checkpoint_object(r, job.fine_tuned_model) for r in rows], more)
