"""Domain errors raised by the store and the life cycle; `service.errors` maps each to an HTTP status.

The core's `adapters.errors.InputError` (bad input, 400) is the fourth kind; it is raised here too.
"""

from __future__ import annotations


class JobsError(Exception):
    """A refusal with OpenAI's error fields: `param` names the offending field, `code` is machine-readable."""

    default_code = "error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code or self.default_code


class NotFound(JobsError):
    """No such object for this tenant (another tenant's object is indistinguishable from an unknown one)."""

    default_code = "not_found"

    @classmethod
    def of(cls, kind: str, id: str, param: str = "id") -> "NotFound":  # noqa: A002 — OpenAI's word
        return cls(f"No such {kind}: {id}", param=param)


class Conflict(JobsError):
    """The request is valid but the object's state does not allow it (a finished job cannot be cancelled)."""

    default_code = "conflict"


class Unavailable(JobsError):
    """A dependency (the broker, the store) cannot take the request now; retrying later may succeed."""

    default_code = "unavailable"


class QuotaExceeded(JobsError):
    """A tenant's quota is used up; `retry_after_s` says when trying again makes sense."""

    default_code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after_s: int, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class StorageQuotaExceeded(JobsError):
    """Storing this would take the tenant past its storage quota."""

    default_code = "storage_quota_exceeded"


class StorageFull(JobsError):
    """The artifact store has no space left (or its filesystem quota is reached)."""

    default_code = "storage_full"


class StorageUnavailable(JobsError):
    """The artifact store cannot be written (read-only, or failing); nothing was changed."""

    default_code = "storage_unavailable"
