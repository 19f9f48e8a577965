"""`/v1/models`: the registered base models and the tenant's fine-tuned models; admin registration."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from jobs.base_models import register_base_model
from jobs.errors import NotFound
from jobs.tables import AdapterRow, BaseModelRow
from service.deps import AdminDep, SessionDep, TenantDep
from service.objects import base_model_object, listing, model_object
from service.schemas import ModelCreate

router = APIRouter(prefix="/v1/models", tags=["models"])


def _fine_tuned(session, tenant_id: str, name: str | None = None):
    query = select(AdapterRow).where(AdapterRow.tenant_id == tenant_id, AdapterRow.fine_tuned_model.is_not(None))
    if name is not None:
        query = query.where(AdapterRow.fine_tuned_model == name)
    return session.scalars(query.order_by(AdapterRow.seq))


@router.get("")
def list_models(session: SessionDep, tenant: TenantDep) -> dict:
    bases = [base_model_object(r) for r in session.scalars(select(BaseModelRow).order_by(BaseModelRow.created_at))]
    tuned = [model_object(a.fine_tuned_model, a.created_at, tenant.name) for a in _fine_tuned(session, tenant.id)]
    return listing(bases + tuned)


@router.get("/{model:path}")
def retrieve_model(model: str, session: SessionDep, tenant: TenantDep) -> dict:
    row = session.get(BaseModelRow, model)
    if row is not None:
        return base_model_object(row)
    adapter = _fine_tuned(session, tenant.id, model).first()
    if adapter is None:
        raise NotFound.of("model", model, "model")
    return model_object(adapter.fine_tuned_model, adapter.created_at, tenant.name)


@router.post("")
async def register_model(body: ModelCreate, session: SessionDep, _admin: AdminDep) -> dict:
    row = await run_in_threadpool(register_base_model, session, body.name, body.path)
    return base_model_object(row)
