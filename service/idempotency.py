"""`Idempotency-Key` on every POST: a retry gets the first answer back and creates nothing new.

A pure ASGI middleware behind `service.gate` (it needs the caller). For a tenant's POST with the
header, the key is claimed in the job store (`jobs.idempotency`) before the route runs:
- **first request**: runs; its body is hashed as the route reads it; a 2xx answer is stored
  with that fingerprint (method, path, body). Any other answer frees the key: nothing was created.
- **retry, same request**: the stored answer, with `Idempotent-Replayed: true`; the route never runs.
- **same key, another request**: 422, since a key names one request.
- **same key while the first is still running**: 409 with `Retry-After: 1`.
"""

from __future__ import annotations

import hashlib
import json

from starlette.concurrency import run_in_threadpool

from jobs import idempotency
from service.deps import Services
from service.gate import answer

MAX_KEY = 255
MAX_STORED_RESPONSE = 1024 * 1024
OPENAPI_PARAMETER = {  # documents the header on the routes that create something
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "A retry with the same key and request gets the first answer back and creates nothing new",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY, "pattern": r"^[\x20-\x7e]+$"}}


def _key(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            return value
    return None


class Fingerprint:
    """sha256 of method, path and body, with a multipart body's boundary (random per encoding) made neutral,
    so a client that encodes the same form again on retry sends the same request."""

    def __init__(self, scope):
        self.digest = hashlib.sha256(f"{scope['method']} {scope['path']}\n".encode())
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        _, _, boundary = content_type.partition(b"boundary=")
        self.boundary = boundary.split(b";")[0].strip(b'" ')
        self.tail = b""

    def update(self, chunk: bytes) -> None:
        if not self.boundary:
            self.digest.update(chunk)
            return
        data = (self.tail + chunk).replace(self.boundary, b"<boundary>")
        keep = len(self.boundary) - 1  # a boundary may be cut between two chunks
        self.digest.update(data[:len(data) - keep] if len(data) > keep else b"")
        self.tail = data[len(data) - keep:] if len(data) > keep else data

    def hexdigest(self) -> str:
        self.digest.update(self.tail)
        self.tail = b""
        return self.digest.hexdigest()


class Idempotency:
    def __init__(self, app, services: Services):
        self.app, self.services = app, services

    async def __call__(self, scope, receive, send) -> None:
        key = _key(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        caller = scope.get("state", {}).get("caller") if key is not None else None
        if key is None or caller is None or caller.tenant is None:
            return await self.app(scope, receive, send)
        if not 0 < len(key) <= MAX_KEY or not key.isascii() or not key.decode().isprintable():
            return await answer(send, 400, f"Idempotency-Key must be 1-{MAX_KEY} printable ASCII characters",
                                "invalid_idempotency_key", "invalid_request_error")
        tenant_id, key_text = caller.tenant.id, key.decode()
        db, ttl = self.services.db, self.services.settings.idempotency_ttl_s
        prior = await run_in_threadpool(idempotency.begin, db, tenant_id, key_text, ttl_s=ttl)
        if prior is None:
            return await self._first(scope, receive, send, tenant_id, key_text)
        if prior.status is None:
            return await answer(send, 409, "A request with this Idempotency-Key is still being processed; retry "
                                "shortly", "idempotency_key_in_use", "invalid_request_error", [(b"retry-after", b"1")])
        digest = Fingerprint(scope)
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if digest.hexdigest() != prior.fingerprint:
            return await answer(send, 422, "This Idempotency-Key was used with a different request; use a new key "
                                "for a new request", "idempotency_key_reused", "invalid_request_error")
        body = json.dumps(prior.response).encode()
        await send({"type": "http.response.start", "status": prior.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"idempotent-replayed", b"true")]})
        await send({"type": "http.response.body", "body": body})

    async def _first(self, scope, receive, send, tenant_id: str, key: str) -> None:
        digest, status, chunks, size = Fingerprint(scope), None, [], 0

        async def hashed_receive():
            message = await receive()
            digest.update(message.get("body", b""))
            return message

        async def captured_send(message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and size <= MAX_STORED_RESPONSE:
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
            await send(message)

        try:
            await self.app(scope, hashed_receive, captured_send)
        except BaseException:
            await run_in_threadpool(idempotency.abandon, self.services.db, tenant_id, key)
            raise
        if status is not None and 200 <= status < 300 and size <= MAX_STORED_RESPONSE:
            try:
                response = json.loads(b"".join(chunks))
            except ValueError:
                response = None
            if response is not None:
                await run_in_threadpool(idempotency.finish, self.services.db, tenant_id, key, digest.hexdigest(),
                                        status, response)
                return
        await run_in_threadpool(idempotency.abandon, self.services.db, tenant_id, key)
