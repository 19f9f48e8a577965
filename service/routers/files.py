"""`/v1/files`: OpenAI's files API for fine-tuning datasets.

An upload is checked with the same validator as `loramill train` (`adapters.data.validate_jsonl`)
before a row exists; a file that fails answers 400 with the validator's line-numbered message
and leaves nothing stored.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import or_, select

from adapters.errors import InputError
from jobs.artifacts import TooLarge, file_key
from jobs.ids import new_id
from jobs.store import FINISHED, get_owned, now, page
from jobs.tables import FileRow, JobRow
from service.deps import ServicesDep, SessionDep, TenantDep
from service.errors import APIError
from service.objects import file_object, listing
from service.uploads import form_files, form_text, plain_filename, read_form, too_large

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune",)


@router.post("")
async def upload_file(request: Request, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    limit = services.settings.max_upload_bytes
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
    try:
        size, _ = store.write_stream(key, upload.file, max_bytes=limit)
        records = validate_jsonl(store.local_path(key), DataConfig())
    except TooLarge:
        store.delete(key)
        raise too_large(limit) from None
    except InputError as exc:
        store.delete(key)
        raise APIError(400, f"{filename}: {exc}".replace(f"{store.local_path(key)}: ", ""), param="file",
                       code="invalid_file") from exc
    row = FileRow(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=size, records=records,
                  storage_key=key, created_at=now())
    session.add(row)
    try:
        session.commit()
    except BaseException:
        store.delete(key)
        raise
    return file_object(row)


@router.get("")
def list_files(session: SessionDep, tenant: TenantDep, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000) -> dict:
    scope = FileRow.tenant_id == tenant.id
    query = select(FileRow).where(scope)
    if purpose is not None:
        query = query.where(FileRow.purpose == purpose)
    rows, more = page(session, query, FileRow, after=after, limit=limit, scope=scope)
    return listing([file_object(r) for r in rows], more)


@router.get("/{file_id}")
def retrieve_file(file_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    return file_object(get_owned(session, FileRow, file_id, tenant.id, "file", "file_id"))


@router.get("/{file_id}/content")
def file_content(file_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> FileResponse:
    row = get_owned(session, FileRow, file_id, tenant.id, "file", "file_id")
    return FileResponse(services.artifacts.local_path(row.storage_key), media_type="application/octet-stream",
                        filename=row.filename)


@router.delete("/{file_id}")
def delete_file(file_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> dict:
    row = get_owned(session, FileRow, file_id, tenant.id, "file", "file_id")
    busy = session.scalar(select(JobRow.id).where(
        JobRow.tenant_id == tenant.id, JobRow.status.not_in(FINISHED),
        or_(JobRow.training_file == file_id, JobRow.validation_file == file_id)))
    if busy:
        raise APIError(409, f"File {file_id} is in use by fine-tuning job {busy}", param="file_id", code="file_in_use")
    session.delete(row)
    session.commit()
    services.artifacts.delete(row.storage_key)
    return {"id": file_id, "object": "file", "deleted": True}
