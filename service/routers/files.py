"""`/v1/files`: OpenAI's files API for fine-tuning datasets.

An upload is checked with the same validator as `loramill train` (`adapters.data.validate_jsonl`)
before a row exists; a file that fails answers 400 with the validator's line-numbered message
and leaves nothing stored.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import false, or_, select

from adapters.errors import InputError
from jobs.artifacts import TooLarge, file_digest, file_key
from jobs.ids import new_id
from jobs.store import FINISHED, findable, get_owned, now, page
from jobs.quotas import check_storage
from jobs.tables import FileRow, JobRow
from service.deps import ServicesDep, SessionDep, TenantDep
from service.downloads import Stored, file_download
from service.errors import APIError
from service.idempotency import OPENAPI_PARAMETER as IDEMPOTENCY_KEY
from service.objects import file_object, listing
from service.responses import BINARY, Deleted, FileList, FileObject, download, errors
from service.uploads import (
    declared_length, form_files, form_text, multipart_body, plain_filename, read_form, too_large,
)

router = APIRouter(prefix="/v1/files", tags=["files"], responses=errors(400, 401, 429))
PURPOSES = ("fine-tune",)
UPLOAD_FORM = multipart_body({
    "purpose": {"type": "string", "enum": list(PURPOSES)},
    "file": {**BINARY, "description": "A JSONL dataset (a .jsonl name), one training example a line"},
}, required=["purpose", "file"])


@router.post("", response_model=FileObject, responses=errors(413, 422, 503, 507),
             openapi_extra={**UPLOAD_FORM, "parameters": [IDEMPOTENCY_KEY]})
async def upload_file(request: Request, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    limit = services.settings.max_upload_bytes
    await run_in_threadpool(check_storage, session, tenant.id, services.settings.max_stored_bytes,
                            declared_length(request))
    form = await read_form(request, limit, max_files=1)
    purpose = form_text(form, "purpose")
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose: {purpose!r} is not supported; use one of {', '.join(PURPOSES)}", param="purpose",
                       code="invalid_purpose")
    (upload,) = form_files(form, "file")
    filename = plain_filename(upload)
    if not filename.endswith(".jsonl"):
        raise APIError(400, f"{filename}: fine-tuning files must be JSONL (.jsonl)", param="file", code="invalid_file_format")
    return await run_in_threadpool(_store, services, session, tenant.id, upload, filename, purpose)


def _store(services, session, tenant_id: str, upload, filename: str, purpose: str) -> dict:
    from adapters.data import DataConfig, validate_jsonl

    file_id = new_id("file")
    key = file_key(tenant_id, file_id)
    store, limit = services.artifacts, services.settings.max_upload_bytes
    stored = False
    try:
        size, sha256 = store.write_stream(key, upload.file, max_bytes=limit)
        check_storage(session, tenant_id, services.settings.max_stored_bytes, size)
        records = validate_jsonl(store.local_path(key), DataConfig(max_line_bytes=services.settings.max_line_bytes))
        row = FileRow(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=size,
                      records=records, sha256=sha256, storage_key=key, created_at=now())
        session.add(row)
        session.commit()
        stored = True
    except TooLarge:
        raise too_large(limit) from None
    except InputError as exc:
        stored_as = store.local_path(key)
        message = str(exc).replace(f"{stored_as}: ", "").removeprefix(f"{stored_as.name}: ")
        raise APIError(400, f"{filename}: {message}", param="file", code="invalid_file") from exc
    finally:
        if not stored:  # refused or failed: nothing stays
            store.discard(key)
    return file_object(row)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, tenant: TenantDep, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000) -> dict:
    scope = FileRow.tenant_id == tenant.id
    query = select(FileRow).where(scope)
    if purpose is not None:  # one no file can have (a NUL) is not asked of the database: PostgreSQL would refuse it
        query = query.where(FileRow.purpose == purpose if findable(purpose) else false())
    rows, more = page(session, query, FileRow, after=after, limit=limit, scope=scope)
    return listing([file_object(r) for r in rows], more)


@router.get("/{file_id}", response_model=FileObject, responses=errors(404))
def retrieve_file(file_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    return file_object(get_owned(session, FileRow, file_id, tenant.id, "file", "file_id"))


@router.get("/{file_id}/content", response_class=StreamingResponse, responses={
    **download("application/octet-stream", "The file's bytes, checked against the sha256 in X-Content-Sha256",
               ranges=True), **errors(404, 416)})
async def file_content(file_id: str, request: Request, services: ServicesDep, session: SessionDep,
                       tenant: TenantDep) -> StreamingResponse:
    row = await run_in_threadpool(get_owned, session, FileRow, file_id, tenant.id, "file", "file_id")
    path = services.artifacts.local_path(row.storage_key)
    if row.sha256 is None:  # stored before digests were kept: recorded now, checked from now on
        digest = await run_in_threadpool(file_digest, path)
        row.sha256 = digest["sha256"]
        await run_in_threadpool(session.commit)
    return await file_download(Stored(path, row.filename, row.bytes, row.sha256), request.headers.get("range"),
                               "application/octet-stream")


@router.delete("/{file_id}", response_model=Deleted, responses=errors(404, 409, 503))
def delete_file(file_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    row = get_owned(session, FileRow, file_id, tenant.id, "file", "file_id")
    busy = session.scalar(select(JobRow.id).where(
        JobRow.tenant_id == tenant.id, JobRow.status.not_in(FINISHED),
        or_(JobRow.training_file == file_id, JobRow.validation_file == file_id)))
    if busy:
        raise APIError(409, f"File {file_id} is in use by fine-tuning job {busy}", param="file_id", code="file_in_use")
    with services.artifacts.removing(row.storage_key):  # the file goes first; put back if the row cannot go
        session.delete(row)
        session.commit()
    return {"id": file_id, "object": "file", "deleted": True}
