"""`/v1/models`: what the caller can ask (base models, its fine-tuned models and adapters); admin registration."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from jobs.base_models import register_base_model
from jobs.store import resolve_model
from jobs.tables import AdapterRow, BaseModelRow
from service.deps import AdminDep, SessionDep, TenantDep
from service.objects import adapter_model_object, base_model_object, listing
from service.responses import AdapterModel, Model, ModelList, errors
from service.schemas import ModelCreate

router = APIRouter(prefix="/v1/models", tags=["models"], responses=errors(400, 401, 429))


def _adapter_models(session, tenant_id: str) -> list[dict]:
    """Each of the tenant's adapters as a model: its fine-tuned model name if a job made it, else its id."""
    rows = session.scalars(select(AdapterRow).where(AdapterRow.tenant_id == tenant_id).order_by(AdapterRow.seq))
    return [adapter_model_object(row) for row in rows]


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, tenant: TenantDep) -> dict:
    """Every model the caller can ask: the base models, then its fine-tuned models and uploaded adapters."""
    bases = [base_model_object(r) for r in session.scalars(select(BaseModelRow).order_by(BaseModelRow.created_at))]
    return listing(bases + _adapter_models(session, tenant.id))


@router.get("/{model:path}", response_model=AdapterModel | Model, responses=errors(404))
def retrieve_model(model: str, session: SessionDep, tenant: TenantDep) -> dict:
    ref = resolve_model(session, tenant.id, model)
    if ref.adapter is None:
        return base_model_object(session.get(BaseModelRow, ref.base))
    return adapter_model_object(ref.adapter)


@router.post("", response_model=Model, responses=errors(403, 409, 413))
async def register_model(body: ModelCreate, session: SessionDep, _admin: AdminDep) -> dict:
    row = await run_in_threadpool(register_base_model, session, body.name, body.path)
    return base_model_object(row)
