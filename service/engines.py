"""The inference engines behind `/v1/completions` and `/v1/chat/completions`, spoken to in vLLM's protocol.

Each base model is served by one engine: the URL configured for it (`LORAMILL_ENGINE_URLS`, JSON
`{"<base model>": "http://host:port"}`: a `loramill engine`, or a vLLM server started with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), or, with none configured, an engine
process this API starts for it on first use (`service.embedded.EmbeddedEngines`).

A tenant's adapter is loaded into its base's engine under its adapter id, with the artifact
store's path (`/v1/load_lora_adapter`; every engine mounts the same artifact volume), the first
time it is asked for. The control plane remembers what each engine holds, so a warm adapter
costs no extra round trip; an engine that forgot (it restarted) answers "model not found", and
the adapter is loaded again and the request sent once more.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from jobs.errors import QuotaExceeded, Unavailable
from jobs.store import ModelRef
from jobs.tenants import TenantRef
from service.embedded import EmbeddedEngines

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """One engine: where it listens and which adapters it holds (by adapter id)."""

    url: str
    loaded: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EngineError(Exception):
    """The engine answered with an error: its status and OpenAI-shaped body, relayed to the caller."""

    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error", {}).get("message", "engine error"))
        self.status, self.body = status, body


def _unavailable(base: str, exc: Exception) -> Unavailable:
    return Unavailable(f"The inference engine for {base!r} is unavailable ({type(exc).__name__}); retry shortly",
                       code="engine_unavailable")


def _error_body(response: httpx.Response, status: int | None = None) -> dict:
    """The engine's error answer as OpenAI's error object (`openai_error`) for `status` (default: the response's);
    a body that is not one becomes its message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": response.text[:500]}
    return openai_error(status or response.status_code, error)


def openai_error(status: int, error: dict) -> dict:
    """An engine's `error` object in OpenAI's shape, as the caller's SDK reads it.

    loramill's engine answers in that shape already. vLLM names `type` after its exception
    (`BadRequestError`, `NotFoundError`) and repeats the HTTP status as an integer `code`; OpenAI's
    types are `invalid_request_error` / `server_error` and its codes strings or null. The message and a
    string `param` are kept.
    """
    code, param = error.get("code"), error.get("param")
    return {"error": {"message": str(error.get("message") or f"engine answered {status}"),
                      "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param if isinstance(param, str) else None,
                      "code": code if isinstance(code, str) else None}}


def _load_refusal_status(response: httpx.Response) -> int:
    """The status to answer for a refused `/v1/load_lora_adapter`.

    vLLM refuses an adapter its engine cannot take (a rank above `--max-lora-rank`, a module it cannot
    adapt) with a 500 "Call to add_lora method failed: Worker failed with error '...'": the adapter does
    not fit this engine, which is up, so it is the caller's 400 (loramill's engine says 400 itself).
    """
    if response.status_code == 500 and "add_lora" in response.text:
        return 400
    return response.status_code


def _forgot(error: EngineError) -> bool:
    """The engine does not know the adapter (it restarted, or evicted its name): load it again."""
    return error.status == 404 or "does not exist" in str(error)


class Engines:
    """Finds (or starts) each base's engine, loads adapters into it, and forwards requests to it."""

    def __init__(self, urls: dict[str, str], embedded: EmbeddedEngines | None, *, timeout_s: float):
        self.urls, self.embedded = dict(urls), embedded
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._engines: dict[str, Engine] = {}
        self._starting: dict[str, asyncio.Lock] = {}

    async def engine_for(self, model: ModelRef) -> Engine:
        engine = self._engines.get(model.base)
        if engine is not None:
            return engine
        lock = self._starting.setdefault(model.base, asyncio.Lock())
        async with lock:
            if model.base not in self._engines:
                if model.base in self.urls:
                    url = self.urls[model.base]
                elif self.embedded is not None:
                    url = await self.embedded.launch(model.base, model.base_path)
                else:
                    raise Unavailable(f"No inference engine serves base model {model.base!r}",
                                      code="engine_unavailable")
                self._engines[model.base] = Engine(url.rstrip("/"))
            return self._engines[model.base]

    def forget(self, base: str) -> None:
        """Drop what is known of `base`'s engine (it died): the next request finds or starts it again."""
        self._engines.pop(base, None)

    async def _load(self, engine: Engine, model: ModelRef, path: str) -> None:
        adapter_id = model.adapter.id
        async with engine.lock:
            if adapter_id in engine.loaded:
                return
            response = await self.client.post(f"{engine.url}/v1/load_lora_adapter",
                                              json={"lora_name": adapter_id, "lora_path": path})
            if response.status_code >= 400 and "already" not in response.text:
                status = _load_refusal_status(response)
                raise EngineError(status, _error_body(response, status))
            engine.loaded.add(adapter_id)

    async def unload(self, base: str, adapter_id: str) -> None:
        """Free an adapter's memory on its engine (it was deleted); best effort."""
        engine = self._engines.get(base)
        if engine is None or adapter_id not in engine.loaded:
            return
        engine.loaded.discard(adapter_id)
        try:
            await self.client.post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": adapter_id})
        except httpx.HTTPError as exc:
            log.warning("unloading %s from %s failed: %s", adapter_id, engine.url, exc)

    async def _send(self, engine: Engine, route: str, body: dict) -> httpx.Response:
        request = self.client.build_request("POST", f"{engine.url}{route}", json=body)
        response = await self.client.send(request, stream=True)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise EngineError(response.status_code, _error_body(response))
        return response

    async def open(self, model: ModelRef, route: str, body: dict, adapter_path: str | None) -> httpx.Response:
        """Send `body` (its `model` set to what the engine calls it) to the model's engine; the open response.

        Raises `EngineError` for the engine's own 4xx/5xx, `Unavailable` when it cannot be reached.
        """
        try:
            engine = await self.engine_for(model)
            if model.adapter is None:
                return await self._send(engine, route, body)
            await self._load(engine, model, adapter_path)
            try:
                return await self._send(engine, route, body)
            except EngineError as exc:
                if not _forgot(exc):
                    raise
                engine.loaded.discard(model.adapter.id)
                await self._load(engine, model, adapter_path)
                return await self._send(engine, route, body)
        except httpx.HTTPError as exc:
            self.forget(model.base)
            raise _unavailable(model.base, exc) from exc

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.embedded is not None:
            self.embedded.stop()


async def relay_events(response: httpx.Response, model_name: str) -> AsyncIterator[bytes]:
    """The engine's server-sent events, each chunk's `model` set to what the caller asked for."""
    try:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                if isinstance(chunk, dict) and "model" in chunk:
                    chunk["model"] = model_name
                line = "data: " + json.dumps(chunk, separators=(",", ":"))
            yield (line + "\n").encode() if line else b"\n"
    finally:
        await response.aclose()


class Generations:
    """Generations running per tenant in this API process; `admit` refuses one past the limit."""

    def __init__(self, limit: int):
        self.limit, self.running = limit, Counter()

    def admit(self, tenant: TenantRef) -> None:
        if self.limit and self.running[tenant.id] >= self.limit:
            raise QuotaExceeded(f"Too many generations at once: the limit is {self.limit} per tenant",
                                retry_after_s=1, code="too_many_generations")
        self.running[tenant.id] += 1

    def done(self, tenant: TenantRef) -> None:
        self.running[tenant.id] -= 1
        if self.running[tenant.id] <= 0:
            del self.running[tenant.id]
