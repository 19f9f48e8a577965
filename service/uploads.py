"""Multipart uploads with a size limit enforced before the body is parsed.

`Content-Length` above the limit is refused at once (413, nothing read); a body without a
length, or a part that grows past the limit while it is copied, is refused the same way and
whatever was written is removed.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from fastapi import Request
from starlette.datastructures import FormData, UploadFile

from service.errors import APIError

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields around the file parts


def too_large(limit: int, param: str = "file") -> APIError:
    return APIError(413, f"Upload too large: the limit is {limit} bytes", param=param, code="file_too_large")


async def read_form(request: Request, max_bytes: int, *, max_files: int) -> FormData:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes * max_files + FORM_OVERHEAD):
        raise too_large(max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Expected a multipart/form-data body", param="file", code="invalid_content_type")
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except Exception as exc:  # noqa: BLE001 — starlette raises its own MultiPartException/HTTPException types
        raise APIError(400, f"Malformed multipart body: {getattr(exc, 'detail', None) or exc}", param="file",
                       code="invalid_multipart") from exc


def form_text(form: FormData, name: str, *, required: bool = True) -> str | None:
    value = form.get(name)
    if value is None:
        if required:
            raise APIError(400, f"Missing required parameter: '{name}'", param=name, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{name}: expected a text field, got a file", param=name, code="invalid_type")
    return value


def form_files(form: FormData, name: str) -> list[UploadFile]:
    files = [v for v in form.getlist(name) if not isinstance(v, str)]
    if not files:
        raise APIError(400, f"Missing required parameter: '{name}' (a file)", param=name, code="missing_required_parameter")
    return files


def plain_filename(upload: UploadFile, param: str = "file") -> str:
    """The upload's file name, refused when it is empty or path-like (`../x`, `a/b`, `C:\\x`)."""
    name = upload.filename or ""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
            or PurePosixPath(name).name != name or name.startswith(".") or len(name) > 255):
        raise APIError(400, f"Invalid file name {name!r}: give a plain file name, not a path", param=param,
                       code="invalid_filename")
    return name
