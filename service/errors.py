"""Every error answer in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`APIError` is raised by routers and dependencies. The handlers installed by `install_handlers`
also translate the domain errors of `jobs/` and the core (`DOMAIN_STATUS`: `InputError` 400,
`NotFound` 404, `Conflict` 409, `Unavailable` 503), FastAPI's request validation errors (400,
`param` = the offending field's dotted path) and Starlette's own 404/405 into the same shape.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import InputError
from jobs.errors import (
    Conflict, JobsError, NotFound, QuotaExceeded, StorageFull, StorageQuotaExceeded, StorageUnavailable, Unavailable,
)

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 416: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 507: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):  # noqa: A002 — OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


DOMAIN_STATUS = {NotFound: 404, Conflict: 409, QuotaExceeded: 429, StorageQuotaExceeded: 413, StorageFull: 507,
                 StorageUnavailable: 503, Unavailable: 503}


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s'\"/,;:()]+/)*[^\s'\"/,;:()]+")


def scrub_paths(message: str, names: dict[str, str]) -> str:
    """`message` with no filesystem path left in it: known paths become their display names, others `<path>`.

    Core errors name files, as a command line should; a tenant must never see where the service
    keeps anything (artifact paths, base models' directories, temporary directories).
    """
    for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
        message = message.replace(path, name)
    return _ABSOLUTE_PATH.sub("<path>", message)


def _respond(status: int, message: str, type: str, param: str | None, code: str | None, headers=None) -> JSONResponse:  # noqa: A002
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _path_names(request: Request) -> dict[str, str]:
    """Display names for paths a route dealt with (`request.state.path_names`, e.g. a base model's directory)."""
    return getattr(request.state, "path_names", {})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return _respond(exc.status, scrub_paths(exc.message, _path_names(request)), exc.type, exc.param, exc.code,
                        headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _respond(400, scrub_paths(str(exc), _path_names(request)), "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(JobsError)
    async def _domain_error(request: Request, exc: JobsError):
        status = DOMAIN_STATUS[type(exc)]
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QuotaExceeded) else None
        return _respond(status, scrub_paths(exc.message, _path_names(request)),
                        _TYPES.get(status, "invalid_request_error"), exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header", "form")
               and _FIELD.fullmatch(str(p))]  # not pydantic's union branch tags ("constrained-str", "list[int]")
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return _respond(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(Exception)
    async def _server_error(_req: Request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return _respond(500, "The server had an error while processing your request", "server_error", None, None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _respond(exc.status_code, str(exc.detail), _TYPES.get(exc.status_code, "invalid_request_error"), None, code,
                        getattr(exc, "headers", None))
