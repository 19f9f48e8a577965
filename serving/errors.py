"""Errors a request can meet, each with the HTTP status it answers with.

`adapters.errors.InputError` (bad input, 400) is the base: every check in `adapters/` raises it and
the engine's own checks do too. The subclasses below carry a different status. The HTTP layer
answers all of them in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from adapters.errors import InputError


class NotFound(InputError):
    """An unknown model or adapter name (404)."""

    status = 404


class Overloaded(InputError):
    """The engine's waiting queue is full (503); the client may retry."""

    status = 503


def error_status(exc: InputError) -> int:
    return getattr(exc, "status", 400)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; `type` as OpenAI names it for the status."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
