"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API, training LoRA adapters.

Create: every reference and option is checked first (unknown or other tenants' files and models,
ranks above `max_rank`, target modules the base lacks → 4xx, nothing stored). Datasets were
validated line by line when uploaded, so file validation (`validating_files`) completes within
the request: the job row is committed as `queued`, and only then is its task enqueued.

"auto" hyperparameters resolve to: n_epochs 3 (1 above 1000 records), batch_size min(8, records),
learning_rate_multiplier 1.0 (the learning rate is 2e-4 × the multiplier).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from adapters.errors import InputError
from service.deps import ServicesDep, SessionDep, TenantDep
from service.errors import APIError
from service.ids import new_id
from service.objects import checkpoint_object, event_object, job_object, listing
from service.queue import commit_then_enqueue
from service.schemas import FineTuningJobCreate, Hyperparameters, LoraOptions
from service.store import add_event, base_model, get_owned, now, page, request_cancel
from service.tables import CheckpointRow, FileRow, JobEventRow, JobRow

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
BASE_LEARNING_RATE = 2e-4


def resolve_hyperparameters(hp: Hyperparameters, records: int) -> dict:
    values = hp.model_dump()
    if hp.n_epochs == "auto":
        values["n_epochs"] = 3 if records <= 1000 else 1
    if hp.batch_size == "auto":
        values["batch_size"] = max(1, min(8, records))
    if hp.learning_rate_multiplier == "auto":
        values["learning_rate_multiplier"] = 1.0
    values["learning_rate"] = BASE_LEARNING_RATE * values["learning_rate_multiplier"]
    if values["checkpoint_every"] is None:  # once per epoch, as OpenAI does
        values["checkpoint_every"] = max(1, -(-records // (values["batch_size"] * values["grad_accum"])))
    return values


def _hyperparameters(body: FineTuningJobCreate) -> Hyperparameters:
    nested = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if nested is not None and body.hyperparameters is not None:
        raise APIError(400, "Give hyperparameters either at the top level or in method.supervised, not both",
                       param="hyperparameters", code="invalid_value")
    return nested or body.hyperparameters or Hyperparameters()


def _lora(body: FineTuningJobCreate, base_path: str, max_rank: int) -> dict:
    from adapters.checkpoint import check_target_modules, resolve_model_dir

    lora = body.lora or LoraOptions()
    if lora.rank > max_rank:
        raise APIError(400, f"lora.rank {lora.rank} is above the maximum rank {max_rank}", param="lora.rank",
                       code="rank_too_large")
    try:
        check_target_modules(resolve_model_dir(base_path), lora.target_modules)
    except InputError as exc:
        raise APIError(400, f"lora.target_modules: {exc}", param="lora.target_modules", code="invalid_value") from exc
    values = lora.model_dump()
    values["alpha"] = values["alpha"] if values["alpha"] is not None else 2 * lora.rank
    return values


def _dataset(session, tenant_id: str, file_id: str | None, param: str) -> FileRow | None:
    if file_id is None:
        return None
    row = get_owned(session, FileRow, file_id, tenant_id, "file", param)
    if row.purpose != "fine-tune":
        raise APIError(400, f"{param}: file {file_id} has purpose {row.purpose!r}, not 'fine-tune'", param=param,
                       code="invalid_file_purpose")
    return row


@router.post("")
def create_job(body: FineTuningJobCreate, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    base = base_model(session, body.model)
    train_file = _dataset(session, tenant.id, body.training_file, "training_file")
    val_file = _dataset(session, tenant.id, body.validation_file, "validation_file")
    hp = resolve_hyperparameters(_hyperparameters(body), train_file.records or 1)
    lora = _lora(body, base.path, services.settings.max_rank)

    job = JobRow(id=new_id("ftjob"), tenant_id=tenant.id, model=base.name, training_file=train_file.id,
                 validation_file=val_file.id if val_file else None, hyperparameters=hp, lora=lora,
                 method={"type": "supervised"}, metadata_=body.metadata, suffix=body.suffix,
                 seed=body.seed if body.seed is not None else 0, status="queued", cancel_requested=False,
                 result_files=[], created_at=now())
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Validating training file: {train_file.id}")
    add_event(session, job.id, "Files validated, moving job to queued state")
    commit_then_enqueue(session, JobRow, job.id, services.queue.enqueue_training, "job")
    return job_object(job)


@router.get("")
def list_jobs(session: SessionDep, tenant: TenantDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    scope = JobRow.tenant_id == tenant.id
    rows, more = page(session, select(JobRow).where(scope), JobRow, after=after, limit=limit, scope=scope)
    return listing([job_object(r) for r in rows], more)


@router.get("/{job_id}")
def retrieve_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    return job_object(get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id"))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    job = get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id")
    request_cancel(session, job)
    return job_object(job)


@router.get("/{job_id}/events")
def list_events(job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
    get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id")
    scope = JobEventRow.job_id == job_id
    rows, more = page(session, select(JobEventRow).where(scope), JobEventRow, after=after, limit=limit, scope=scope)
    return listing([event_object(r) for r in rows], more)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict:
    job = get_owned(session, JobRow, job_id, tenant.id, "fine-tuning job", "fine_tuning_job_id")
    scope = CheckpointRow.job_id == job_id
    rows, more = page(session, select(CheckpointRow).where(scope), CheckpointRow, after=after, limit=limit, scope=scope)
    return listing([checkpoint_object(r, job.fine_tuned_model) for r in rows], more)
