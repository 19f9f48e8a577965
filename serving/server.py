"""The engine's HTTP face: the subset of vLLM's OpenAI-compatible server that multi-LoRA serving uses.

    POST /v1/completions, /v1/chat/completions    `model`: the served base name or a loaded `lora_name`;
                                                  `stream` sends server-sent events ending `data: [DONE]`
    GET  /v1/models                               the base, then every loaded adapter (`parent`: the base)
    POST /v1/load_lora_adapter                    {"lora_name", "lora_path", "load_inplace"?} -> 200 text
    POST /v1/unload_lora_adapter                  {"lora_name"} -> 200 text; unknown name 404
    GET  /health                                  200 once the model is loaded (the server listens only then)
    GET  /metrics                                 Prometheus text

Errors are `{"error": {"message", "type", "param", "code"}}` with a 4xx for every bad input. A client
that disconnects aborts its request: streaming through the response's own disconnect handling,
non-streaming by watching the connection while the request runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from adapters.errors import InputError
from serving.engine import AsyncEngine, Delta
from serving.errors import error_body, error_status
from serving.protocol import (ChatCompletionRequest, CompletionRequest, Logprobs, completion_id, now, parse,
                              usage)

MAX_BODY_BYTES = 8 * 1024 * 1024


class EngineFailure(Exception):
    """The engine failed a request it had accepted (500)."""


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


async def _json_body(request: Request) -> object:
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InputError(f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the request body is not valid JSON: {exc}") from exc


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: AsyncEngine, *, max_model_len: int, default_max_tokens: int | None = None) -> FastAPI:
    app = FastAPI(title="loramill engine", docs_url=None, redoc_url=None)
    tokenizer = engine.engine.tokenizer
    logprobs_shape = Logprobs(tokenizer)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return _error(error_status(exc), str(exc), exc.param, exc.code)

    @app.exception_handler(EngineFailure)
    async def _engine_failure(_: Request, exc: EngineFailure) -> JSONResponse:
        return _error(500, str(exc))

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc) -> JSONResponse:
        return _error(404, f"no route {request.url.path}")

    @app.exception_handler(405)
    async def _not_allowed(request: Request, _exc) -> JSONResponse:
        return _error(405, f"method {request.method} is not allowed on {request.url.path}")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        created = now()
        cards = [{"id": engine.served_name, "object": "model", "created": created, "owned_by": "loramill",
                  "root": engine.served_name, "parent": None, "max_model_len": max_model_len}]
        cards += [{"id": ref.name, "object": "model", "created": created, "owned_by": "loramill",
                   "root": str(ref.path), "parent": engine.served_name}
                  for ref in engine.adapters.values()]
        return {"object": "list", "data": cards}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, (str, type(None))) or not isinstance(path, (str, type(None))):
            raise InputError("lora_name and lora_path must be strings", param="lora_name")
        await engine.load_adapter(name or "", path or "", bool(body.get("load_inplace", False)))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await _json_body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, (str, type(None))):
            raise InputError("lora_name must be a string", param="lora_name")
        await engine.unload_adapter(name or "")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def _start(request: Request, kind: type, chat: bool):
        """Parse, tokenize, check; return the request, its model name and the delta stream."""
        req = parse(kind, await _json_body(request))
        adapter = engine.resolve(req.model)
        prompt = req.prompt_ids(tokenizer)
        if chat:
            max_tokens = req.max_completion_tokens or req.max_tokens
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            max_tokens, logprobs = req.max_tokens, req.logprobs
        if max_tokens is None:  # to the end of the context, as OpenAI's chat does, within the operator's bound
            max_tokens = max(1, min(max_model_len - len(prompt), default_max_tokens or max_model_len))
        params = req.sampling(max_tokens, logprobs)
        return req, req.model or engine.served_name, prompt, engine.generate(prompt, params, adapter, req.user)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req, model, prompt, deltas = await _start(request, CompletionRequest, chat=False)
        rid, created = completion_id("cmpl"), now()
        echo = tokenizer.decode(prompt) if req.echo else ""

        def chunk(text: str, entries, finish: str | None, offset: int) -> dict:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": logprobs_shape.completions(entries, offset) if req.logprobs is not None else None}
            return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

        if req.stream:
            async def events() -> AsyncIterator[str]:
                offset = 0
                if echo:
                    yield _sse({**chunk(echo, [], None, 0), **({"usage": None} if req.include_usage else {})})
                    offset = len(echo)
                last = None
                async for delta in deltas:
                    if delta.error:
                        yield _sse(error_body(500, delta.error))
                        break
                    last = delta
                    if delta.text or delta.finish_reason or (delta.logprobs and req.logprobs is not None):
                        body = chunk(delta.text, delta.logprobs, delta.finish_reason, offset)
                        if req.include_usage:
                            body["usage"] = None
                        yield _sse(body)
                    offset += len(delta.text)
                if req.include_usage and last is not None:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                "choices": [], "usage": usage(last.prompt_tokens, last.completion_tokens)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        text, entries, last = await _collect(request, deltas)
        if last is None:
            return Response(status_code=499)
        body = chunk(echo + text, entries, last.finish_reason, len(echo))
        body["usage"] = usage(last.prompt_tokens, last.completion_tokens)
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, model, _, deltas = await _start(request, ChatCompletionRequest, chat=True)
        rid, created = completion_id("chatcmpl"), now()

        def chunk(delta: dict, entries, finish: str | None) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": logprobs_shape.chat(entries) if req.logprobs and entries else None}
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice]}
            if req.include_usage:
                body["usage"] = None
            return body

        if req.stream:
            async def events() -> AsyncIterator[str]:
                yield _sse(chunk({"role": "assistant", "content": ""}, [], None))
                last = None
                async for delta in deltas:
                    if delta.error:
                        yield _sse(error_body(500, delta.error))
                        break
                    last = delta
                    if delta.text or delta.finish_reason or (delta.logprobs and req.logprobs):
                        yield _sse(chunk({"content": delta.text} if delta.text else {}, delta.logprobs,
                                         delta.finish_reason))
                if req.include_usage and last is not None:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [], "usage": usage(last.prompt_tokens, last.completion_tokens)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        text, entries, last = await _collect(request, deltas)
        if last is None:
            return Response(status_code=499)
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": logprobs_shape.chat(entries) if req.logprobs else None,
                  "finish_reason": last.finish_reason}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": [choice], "usage": usage(last.prompt_tokens, last.completion_tokens)})

    return app


async def _collect(request: Request, deltas: AsyncIterator[Delta]) -> tuple[str, list, Delta | None]:
    """Run a non-streaming request to the end, or abort it if the client disconnects first.

    Returns the text, the log-probabilities and the last delta (None: the client went away).
    Raises `EngineFailure` when the engine failed the request.
    """
    async def run() -> tuple[str, list, Delta]:
        texts, entries, last = [], [], None
        async for delta in deltas:
            texts.append(delta.text)
            entries.extend(delta.logprobs)
            last = delta
        return "".join(texts), entries, last

    task = asyncio.create_task(run())
    watcher = asyncio.create_task(_until_disconnect(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await deltas.aclose()
        return "", [], None
    text, entries, last = task.result()
    if last is not None and last.error:
        raise EngineFailure(last.error)
    return text, entries, last
