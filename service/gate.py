"""What every `/v1/` request passes before the app reads a byte of its body.

A pure ASGI middleware, in this order:
1. **Authentication**: `Authorization: Bearer <key>` names a tenant (or the admin key); anything
   else is answered 401 at once, so an unauthenticated caller costs a header lookup, never a body.
   Who called is left in `scope["state"]["caller"]` for the routes' dependencies.
2. **Rate limit**: a token bucket per tenant (`requests_per_minute`, per API process); 429 with
   `Retry-After` when it is empty.
3. **Body bound**: a JSON (non-multipart) body is read here, whole, up to `max_json_bytes`, and
   replayed to the app; a longer one (declared or streamed) is answered 413 without reading the
   rest. Multipart uploads stream to their routes, which bound them as they read
   (`service.uploads`).

Headers themselves are bounded by the HTTP protocol (`service.http_protocol`), before any of this.
"""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from jobs.tenants import TenantRef, key_digest, tenant_for_digest
from service.deps import Services
from service.errors import error_body

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def authenticated(path: str) -> bool:
    """Whether requests to `path` must carry a key: the API (`/v1/…`), not health, metrics or the docs."""
    return path.startswith("/v1/") or path == "/v1"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant, or the admin (whose key registers base models)."""

    tenant: TenantRef | None
    admin: bool = False


class TokenBuckets:
    """`rate` requests per minute per tenant, in bursts of up to `rate`; thread-safe."""

    def __init__(self, per_minute: int, clock=time.monotonic, max_tenants: int = 100_000):
        self.rate, self.clock, self.max_tenants = per_minute / 60.0, clock, max_tenants
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, tenant_id: str) -> float:
        """0 when a request may go now, else the seconds until one may."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[tenant_id] = (tokens, now)
                return (1 - tokens) / self.rate
            if len(self._buckets) >= self.max_tenants and tenant_id not in self._buckets:
                self._buckets.clear()  # bounded memory; a full reset only ever lets requests through
            self._buckets[tenant_id] = (tokens - 1, now)
            return 0.0


async def answer(send, status: int, message: str, code: str, error_type: str, headers=()) -> None:
    body = json.dumps(error_body(message, error_type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class Gate:
    def __init__(self, app, services: Services):
        self.app, self.services = app, services
        settings = services.settings
        self.max_json_bytes = settings.max_json_bytes
        self.buckets = TokenBuckets(settings.requests_per_minute) if settings.requests_per_minute else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not authenticated(scope["path"]):
            return await self.app(scope, receive, send)
        caller = await self._authenticate(scope)
        if caller is None:
            return await answer(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                 "invalid_api_key", "invalid_request_error", [(b"www-authenticate", b"Bearer")])
        if caller.tenant is not None and self.buckets is not None:
            wait = self.buckets.take(caller.tenant.id)
            if wait:
                limit = self.services.settings.requests_per_minute
                return await answer(send, 429, f"Rate limit reached: {limit} requests per minute; retry in "
                                     f"{math.ceil(wait)} s", "rate_limit_exceeded", "rate_limit_error",
                                     [(b"retry-after", str(math.ceil(wait)).encode())])
        scope.setdefault("state", {})["caller"] = caller
        if scope["method"] in BODY_METHODS and not (_header(scope, b"content-type") or b"").startswith(
                b"multipart/form-data"):
            body = await self._bounded_body(scope, receive)
            if body is None:
                return await answer(send, 413, f"Request body too large: the limit is {self.max_json_bytes} bytes",
                                     "request_too_large", "invalid_request_error")
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _authenticate(self, scope) -> Caller | None:
        scheme, _, key = (_header(scope, b"authorization") or b"").decode("latin-1").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        admin_key = self.services.settings.admin_key
        if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
            return Caller(None, admin=True)
        digest = key_digest(key)
        tenant = self.services.tenants.get(digest)
        if tenant is None:
            tenant = await run_in_threadpool(self._lookup, digest)
            if tenant is None:
                return None
            self.services.tenants.put(digest, tenant)
        return Caller(tenant)

    def _lookup(self, digest: str) -> TenantRef | None:
        with self.services.db.sessions() as session:
            return tenant_for_digest(session, digest)

    async def _bounded_body(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it is known to pass `max_json_bytes`."""
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_json_bytes):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_json_bytes:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
