"""Multipart uploads with a size limit enforced before and while the body is read.

`Content-Length` above the limit is refused at once (413, nothing read). A body without a
length (chunked) is counted as it streams into the parser and refused the same way as soon as
it passes the limit; the parser's spooled temporary files are anonymous, so nothing remains.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import PurePosixPath

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartParser

from service.errors import APIError

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields around the file parts


def multipart_body(fields: dict[str, dict], required: list[str]) -> dict:
    """OpenAPI `requestBody` of a multipart form parsed by hand (`read_form`): each field's JSON schema."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": fields, "required": required}}}}}


def too_large(limit: int, param: str = "file") -> APIError:
    return APIError(413, f"Upload too large: the limit is {limit} bytes", param=param, code="file_too_large")


def declared_length(request: Request) -> int:
    """The body's declared `Content-Length` (0 when absent or not a number; `read_form` refuses those)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else 0


async def read_form(request: Request, max_bytes: int, *, max_files: int) -> FormData:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes * max_files + FORM_OVERHEAD):
        raise too_large(max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Expected a multipart/form-data body", param="file", code="invalid_content_type")
    try:
        async with aclosing(_at_most(request.stream(), max_bytes * max_files + FORM_OVERHEAD, max_bytes)) as stream:
            return await MultiPartParser(request.headers, stream, max_files=max_files, max_fields=16).parse()
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 — starlette raises its own MultiPartException types
        raise APIError(400, f"Malformed multipart body: {getattr(exc, 'message', None) or exc}", param="file",
                       code="invalid_multipart") from exc


async def _at_most(stream: AsyncIterator[bytes], cap: int, limit: int) -> AsyncIterator[bytes]:
    """`stream`, refused with 413 once more than `cap` bytes have passed.

    Yields to the event loop between chunks: when the body arrives faster than it is parsed, the
    server's receive() returns without ever suspending, and a large upload would otherwise be
    parsed in one go while every other request waits.
    """
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > cap:
            raise too_large(limit)
        yield chunk
        await asyncio.sleep(0)


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
