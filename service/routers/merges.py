"""`/v1/merges`: merge adapters into a full Hugging Face checkpoint (runs on the `merge` queue).

`adapters[].adapter` is an adapter id or a fine-tuned model name (`ft:…`). Finished merges list
their files with sizes and sha256 (from the checkpoint's `loramill-manifest.json`); one file
downloads with HTTP `Range` support and an `X-Content-Sha256` header, the whole checkpoint as a tar.
`POST /v1/merges/{id}/cancel` stops a queued or running merge (status `cancelled`, nothing kept);
`GET /v1/merges/{id}/events` pages its event log (start, progress, end), as fine-tuning jobs do.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from jobs.ids import new_id
from jobs.lifecycle import MERGE, request_cancel, submit
from jobs.base_models import checkpoint_bytes
from jobs.quotas import check_active_jobs, check_storage
from jobs.store import adapter_by_ref, base_model, get_owned, now, page
from jobs.tables import MergeEventRow, MergeRow
from service.deps import ServicesDep, SessionDep, TenantDep
from service.downloads import Stored, archive_download, file_download
from service.errors import APIError
from service.idempotency import OPENAPI_PARAMETER as IDEMPOTENCY_KEY
from service.objects import event_object, listing, merge_object
from service.responses import Merge, MergeEventList, MergeFiles, MergeList, download, errors
from service.schemas import MergeCreate

router = APIRouter(prefix="/v1/merges", tags=["merges"], responses=errors(400, 401, 429))


@router.post("", response_model=Merge, responses=errors(404, 413, 422, 503),
             openapi_extra={"parameters": [IDEMPOTENCY_KEY]})
def create_merge(body: MergeCreate, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    from merge.methods import make_method
    from merge.writer import parse_size

    make_method(body.method, density=body.density, drop_rate=body.drop_rate, rank=body.rank, seed=body.seed)
    parse_size(body.max_shard_size)  # what the worker will do with these, refused now rather than there
    base = base_model(session, body.base_model, param="base_model")
    if body.rank is not None and body.rank > services.settings.max_rank:
        raise APIError(400, f"rank {body.rank} is above the maximum rank {services.settings.max_rank}", param="rank",
                       code="rank_too_large")
    refs = []
    for i, item in enumerate(body.adapters):
        adapter = adapter_by_ref(session, item.adapter, tenant.id, f"adapters.{i}.adapter")
        if adapter.base_model != base.name:
            raise APIError(400, f"adapters.{i}: adapter {adapter.id} was trained on {adapter.base_model!r}, not {base.name!r}",
                           param=f"adapters.{i}.adapter", code="base_mismatch")
        refs.append({"adapter": item.adapter, "adapter_id": adapter.id, "weight": float(item.weight)})
    request = {**body.model_dump(exclude={"adapters", "base_model"}), "adapters": refs}
    check_active_jobs(session, tenant.id, services.settings.max_active_jobs)
    check_storage(session, tenant.id, services.settings.max_stored_bytes, checkpoint_bytes(base.path))
    row = MergeRow(id=new_id("merge"), tenant_id=tenant.id, base_model=base.name, request=request, status="queued",
                   files=[], created_at=now(), enqueued_at=time.time())
    session.add(row)
    submit(session, MERGE, row.id, services.queue)
    return merge_object(row)


@router.get("", response_model=MergeList)
def list_merges(session: SessionDep, tenant: TenantDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    scope = MergeRow.tenant_id == tenant.id
    rows, more = page(session, select(MergeRow).where(scope), MergeRow, after=after, limit=limit, scope=scope)
    return listing([merge_object(r) for r in rows], more)


@router.post("/{merge_id}/cancel", response_model=Merge, responses=errors(404, 409))
def cancel_merge(merge_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    """A queued merge is cancelled at once; a running one is flagged and its worker stops within a second."""
    row = get_owned(session, MergeRow, merge_id, tenant.id, "merge", "merge_id")
    request_cancel(session, MERGE, row.id)
    session.refresh(row)
    return merge_object(row)


@router.get("/{merge_id}/events", response_model=MergeEventList, responses=errors(404))
def list_merge_events(merge_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
    get_owned(session, MergeRow, merge_id, tenant.id, "merge", "merge_id")
    scope = MergeEventRow.merge_id == merge_id
    rows, more = page(session, select(MergeEventRow).where(scope), MergeEventRow, after=after, limit=limit, scope=scope)
    return listing([event_object(r, "merge.event") for r in rows], more)


@router.get("/{merge_id}", response_model=Merge, responses=errors(404))
def retrieve_merge(merge_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    return merge_object(get_owned(session, MergeRow, merge_id, tenant.id, "merge", "merge_id"))


def _finished(session, merge_id: str, tenant_id: str) -> MergeRow:
    row = get_owned(session, MergeRow, merge_id, tenant_id, "merge", "merge_id")
    if row.status != "succeeded":
        raise APIError(409, f"Merge {merge_id} is {row.status}; its files exist once it has succeeded", param="merge_id",
                       code="merge_not_ready")
    return row


@router.get("/{merge_id}/files", response_model=MergeFiles, responses=errors(404, 409))
def list_merge_files(merge_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    row = _finished(session, merge_id, tenant.id)
    return {"object": "list", "data": [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in row.files]}


@router.get("/{merge_id}/files/{name}", response_class=StreamingResponse, responses={
    **download("application/octet-stream", "The file's bytes, checked against the manifest's sha256 (in "
               "X-Content-Sha256)", ranges=True), **errors(404, 409, 416)})
async def download_merge_file(merge_id: str, name: str, request: Request, services: ServicesDep, session: SessionDep,
                              tenant: TenantDep) -> StreamingResponse:
    row = await run_in_threadpool(_finished, session, merge_id, tenant.id)
    entry = next((f for f in row.files if f["name"] == name), None)
    if entry is None:  # only manifest names are served: no path ever reaches the filesystem unchecked
        raise APIError(404, f"Merge {merge_id} has no file {name!r}", param="name", code="not_found")
    path = services.artifacts.local_path(row.storage_key) / entry["name"]
    return await file_download(Stored(path, entry["name"], entry["bytes"], entry["sha256"]),
                               request.headers.get("range"), "application/octet-stream")


@router.get("/{merge_id}/archive", response_class=StreamingResponse, responses={
    **download("application/x-tar", "The merged checkpoint as a tar of <merge_id>/<file>, each file checked"),
    **errors(404, 409)})
def download_merge_archive(merge_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> StreamingResponse:
    """The merged checkpoint as a tar (`<merge_id>/<file>`), each file checked against the manifest's sha256."""
    row = _finished(session, merge_id, tenant.id)
    root = services.artifacts.local_path(row.storage_key)
    return archive_download([Stored(root / f["name"], f["name"], f["bytes"], f["sha256"]) for f in row.files], row.id)
