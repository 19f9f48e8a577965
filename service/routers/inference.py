"""`/v1/completions` and `/v1/chat/completions`: a tenant asks a base model or one of its adapters.

`model` is a base model's name, one of the caller's fine-tuned model names (`ft:…`) or one of its
adapter ids; another tenant's model answers 404 `model_not_found` like an unknown one. The request
is bounded here (`max_tokens` ≤ `LORAMILL_MAX_GENERATION_TOKENS`, one prompt, at most
`LORAMILL_MAX_CONCURRENT_GENERATIONS` running per tenant: 429 beyond), then forwarded in vLLM's
protocol to the base model's engine (`service.engines`) with `model` set to the adapter's id on the
engine and `user` to the tenant, so the engine's fair scheduler shares it between tenants. The
answer, or its server-sent events, come back with `model` as the caller wrote it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from jobs.store import ModelRef, resolve_model
from jobs.tenants import TenantRef
from service.deps import ServicesDep, SessionDep, TenantDep
from service.engines import EngineError, Generations, relay_events
from service.errors import APIError, scrub_paths
from service.responses import ChatCompletion, Completion, errors, streamed
from service.schemas import ChatCompletionCreate, CompletionCreate

router = APIRouter(prefix="/v1", tags=["inference"], responses=errors(400, 401, 404, 413, 429, 503))


def _bound(services, body) -> None:
    cap = services.settings.max_generation_tokens
    for field in ("max_tokens", "max_completion_tokens"):
        wanted = getattr(body, field, None)
        if wanted is not None and wanted > cap:
            raise APIError(400, f"{field} {wanted} is above the maximum of {cap} tokens", param=field,
                           code="invalid_value")


async def _forward(route: str, body, services, session, tenant: TenantRef):
    _bound(services, body)
    model: ModelRef = await run_in_threadpool(resolve_model, session, tenant.id, body.model)
    payload = body.model_dump(exclude_none=True)
    payload["model"] = model.adapter.id if model.adapter is not None else model.base
    payload["user"] = tenant.id
    adapter_path = str(services.artifacts.local_path(model.adapter.storage_key)) if model.adapter else None
    generations: Generations = services.generations
    generations.admit(tenant)
    try:
        response = await services.engines.open(model, route, payload, adapter_path)
    except EngineError as exc:
        generations.done(tenant)
        error = exc.body["error"]
        error["message"] = scrub_paths(str(error.get("message", "")), {})
        return JSONResponse(exc.body, status_code=exc.status if exc.status < 500 else 503)
    except BaseException:
        generations.done(tenant)
        raise
    if body.stream:
        async def events() -> AsyncIterator[bytes]:
            try:
                async for line in relay_events(response, body.model):
                    yield line
            finally:
                generations.done(tenant)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        answer = await response.aread()
    finally:
        await response.aclose()
        generations.done(tenant)
    result = await asyncio.to_thread(_with_model, answer, body.model)
    return JSONResponse(result)


def _with_model(raw: bytes, name: str) -> dict:
    import json

    result = json.loads(raw)
    result["model"] = name
    return result


@router.post("/completions", response_model=Completion, responses={200: {"content": streamed("text_completion")}})
async def create_completion(body: CompletionCreate, services: ServicesDep, session: SessionDep, tenant: TenantDep):
    return await _forward("/v1/completions", body, services, session, tenant)


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": streamed("chat.completion.chunk")}})
async def create_chat_completion(body: ChatCompletionCreate, services: ServicesDep, session: SessionDep,
                                 tenant: TenantDep):
    return await _forward("/v1/chat/completions", body, services, session, tenant)
