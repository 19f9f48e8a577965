"""`/v1/adapters`: the tenant's PEFT adapters, uploaded or produced by fine-tuning jobs.

Upload: multipart with `base_model` (a registered model name), optional `name`, and the
adapter's files as repeated `file` parts named `adapter_config.json` and
`adapter_model.safetensors`. Pickled weights (`.bin`, `.pt`, …) and path-like names are refused;
the adapter is validated against its base (`adapters.peft_format.validate_adapter`: every LoRA
tensor's shape against the module it targets, target modules present, rank ≤ `max_rank`) in a
temporary directory that becomes the stored adapter only when it passes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from adapters.checkpoint import PICKLE_SUFFIXES
from adapters.errors import InputError
from adapters.peft_format import ADAPTER_FILES, WEIGHTS_NAME
from jobs.artifacts import TooLarge, adapter_key, file_digest
from jobs.ids import new_id
from jobs.quotas import check_storage
from jobs.store import FINISHED, base_model, get_owned, now, page
from jobs.tables import AdapterRow, BaseModelRow, MergeRow
from jobs.tenants import check_name
from service.deps import ServicesDep, SessionDep, TenantDep
from service.downloads import Stored, archive_download, file_download
from service.errors import APIError
from service.idempotency import OPENAPI_PARAMETER as IDEMPOTENCY_KEY
from service.objects import adapter_object, listing
from service.responses import BINARY, Adapter, AdapterList, Deleted, download, errors
from service.uploads import (
    declared_length, form_files, form_text, multipart_body, plain_filename, read_form, too_large,
)

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=errors(400, 401, 429))
UPLOAD_FORM = multipart_body({
    "base_model": {"type": "string", "description": "A registered base model's name"},
    "name": {"type": "string", "description": "A display name (default: the adapter's id)"},
    "file": {"type": "array", "items": BINARY, "minItems": len(ADAPTER_FILES), "maxItems": len(ADAPTER_FILES),
             "description": f"The adapter's files, as parts named {' and '.join(ADAPTER_FILES)}"},
}, required=["base_model", "file"])


@router.post("", response_model=Adapter, responses=errors(404, 413, 422, 503, 507),
             openapi_extra={**UPLOAD_FORM, "parameters": [IDEMPOTENCY_KEY]})
async def upload_adapter(request: Request, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    limit = services.settings.max_upload_bytes
    await run_in_threadpool(check_storage, session, tenant.id, services.settings.max_stored_bytes,
                            declared_length(request))
    form = await read_form(request, limit, max_files=len(ADAPTER_FILES))
    base = await run_in_threadpool(base_model, session, form_text(form, "base_model"), "base_model")
    request.state.path_names = {base.path: repr(base.name)}  # errors name the base model, never its directory
    name = form_text(form, "name", required=False)
    uploads = {}
    for upload in form_files(form, "file"):
        filename = plain_filename(upload)
        if filename.endswith(PICKLE_SUFFIXES):
            raise APIError(400, f"{filename}: pickled weights are refused; upload {WEIGHTS_NAME}",
                           param="file", code="pickled_weights")
        if filename not in ADAPTER_FILES:
            raise APIError(400, f"{filename}: unexpected file; an adapter is {' + '.join(ADAPTER_FILES)}",
                           param="file", code="invalid_filename")
        uploads[filename] = upload
    missing = [f for f in ADAPTER_FILES if f not in uploads]
    if missing:
        raise APIError(400, f"Missing adapter file {missing[0]}", param="file", code="missing_required_parameter")
    if name is not None:
        check_name(name, "adapter")
    return await run_in_threadpool(_store, services, session, tenant.id, base, name, uploads)


def _store(services, session, tenant_id: str, base, name: str | None, uploads) -> dict:
    from adapters.peft_format import validate_adapter

    adapter_id = new_id("adapter")
    key = adapter_key(tenant_id, adapter_id)
    limit = services.settings.max_upload_bytes
    try:
        with services.artifacts.directory(key) as tmp:
            size = 0
            for filename, upload in uploads.items():
                with open(tmp / filename, "wb") as out:
                    while chunk := upload.file.read(1 << 20):
                        size += len(chunk)
                        if size > limit:
                            raise TooLarge(limit)
                        out.write(chunk)
            check_storage(session, tenant_id, services.settings.max_stored_bytes, size)
            renames = session.scalar(select(BaseModelRow.renames).where(BaseModelRow.name == base.name))
            adapter = validate_adapter(tmp, base.path, max_rank=services.settings.max_rank, renames=renames)
            files = [file_digest(tmp / filename) for filename in ADAPTER_FILES]
    except TooLarge:
        raise too_large(limit) from None
    except InputError as exc:
        raise APIError(400, str(exc), param=exc.param or "file", code=exc.code or "invalid_adapter") from exc
    targets = adapter.config.get("target_modules")
    row = AdapterRow(id=adapter_id, tenant_id=tenant_id, name=name or adapter_id, base_model=base.name,
                     rank=adapter.max_rank, target_modules=sorted(targets) if isinstance(targets, list) else [targets],
                     bytes=size, files=files, storage_key=key, created_at=now())
    session.add(row)
    try:
        session.commit()
    except BaseException:
        services.artifacts.discard(key)
        raise
    return adapter_object(row)


@router.get("", response_model=AdapterList)
def list_adapters(session: SessionDep, tenant: TenantDep, after: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    scope = AdapterRow.tenant_id == tenant.id
    rows, more = page(session, select(AdapterRow).where(scope), AdapterRow, after=after, limit=limit, scope=scope)
    return listing([adapter_object(r) for r in rows], more)


@router.get("/{adapter_id}", response_model=Adapter, responses=errors(404))
def retrieve_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    return adapter_object(get_owned(session, AdapterRow, adapter_id, tenant.id, "adapter", "adapter_id"))


def _stored_files(services, session, adapter_id: str, tenant_id: str) -> list[Stored]:
    row = get_owned(session, AdapterRow, adapter_id, tenant_id, "adapter", "adapter_id")
    root = services.artifacts.local_path(row.storage_key)
    if row.files is None:  # stored before digests were kept: recorded now, checked from now on
        row.files = [file_digest(root / name) for name in ADAPTER_FILES]
        session.commit()
    return [Stored(root / f["name"], f["name"], f["bytes"], f["sha256"]) for f in row.files]


@router.get("/{adapter_id}/archive", response_class=StreamingResponse, responses={
    **download("application/x-tar", "A tar of <adapter_id>/" + ", <adapter_id>/".join(ADAPTER_FILES) + ", each "
               "file checked"), **errors(404)})
def download_adapter(adapter_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> StreamingResponse:
    """The adapter as a tar (`<adapter_id>/adapter_config.json`, `…/adapter_model.safetensors`), each file checked."""
    return archive_download(_stored_files(services, session, adapter_id, tenant.id), adapter_id)


@router.get("/{adapter_id}/files/{name}", response_class=StreamingResponse, responses={
    **download("application/octet-stream", "The file's bytes, checked against the sha256 in X-Content-Sha256",
               ranges=True), **errors(404, 416)})
async def download_adapter_file(adapter_id: str, name: str, request: Request, services: ServicesDep,
                                session: SessionDep, tenant: TenantDep) -> StreamingResponse:
    """One of the adapter's files (as the object's `files` list them), with `X-Content-Sha256` and `Range` support."""
    stored = await run_in_threadpool(_stored_files, services, session, adapter_id, tenant.id)
    entry = next((f for f in stored if f.name == name), None)
    if entry is None:  # only recorded names are served: no path ever reaches the filesystem unchecked
        raise APIError(404, f"Adapter {adapter_id} has no file {name!r}", param="name", code="not_found")
    return await file_download(entry, request.headers.get("range"), "application/octet-stream")


@router.delete("/{adapter_id}", response_model=Deleted, responses=errors(404, 409, 503))
def delete_adapter(adapter_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep,
                   background: BackgroundTasks) -> dict:
    row = get_owned(session, AdapterRow, adapter_id, tenant.id, "adapter", "adapter_id")
    for merge in session.scalars(select(MergeRow).where(MergeRow.tenant_id == tenant.id, MergeRow.status.not_in(FINISHED))):
        if any(a["adapter_id"] == adapter_id for a in merge.request["adapters"]):
            raise APIError(409, f"Adapter {adapter_id} is in use by merge {merge.id}", param="adapter_id", code="adapter_in_use")
    with services.artifacts.removing(row.storage_key):  # the files go first; put back if the row cannot go
        session.delete(row)
        session.commit()
    background.add_task(services.engines.unload, row.base_model, adapter_id)  # its engine memory, after the answer
    return {"id": adapter_id, "object": "adapter", "deleted": True}
