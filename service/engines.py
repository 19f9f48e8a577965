"""The inference engines behind `/v1/completions` and `/v1/chat/completions`, spoken to in vLLM's protocol.

Each base model is served by the engines configured for it (`LORAMILL_ENGINE_URLS`, JSON
`{"<base model>": ["http://host:port", ...]}` or one URL as a string: `loramill engine`s, or vLLM
servers started with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), or, with none
configured, by one engine process this API starts for it on first use (`service.embedded`).

**Routing** (`service.routing`): a request for an adapter goes to the engine that rendezvous
hashing on the adapter id picks among the base's usable engines, so it lands where the adapter is
already loaded, the same engine from every API replica; when that engine has too many requests in
flight from this process it spills to the next in the adapter's order (bounded load). A request
for the base alone is routed on the tenant's id.

**Loading on miss.** An adapter is loaded into the chosen engine under its adapter id, with the
artifact store's path (`/v1/load_lora_adapter`; every engine mounts the same artifact volume), the
first time that engine is asked for it. What each engine holds is remembered per engine, so a warm
adapter costs no extra round trip; an engine that forgot it (it restarted) answers "model not
found", and the adapter is loaded again and the request sent once more.

**Health.** An engine that refuses or drops a connection is marked down at once, forgets what it
held, and the request goes to the next engine in its order (a generation has no side effect, so
sending it again is safe); the adapter is loaded there on demand. A probe task
(`LORAMILL_ENGINE_PROBE_INTERVAL_S`) asks every engine's `/health` and marks it up or down, and
reads the engines drained for a restart from the job store (`jobs.engine_drains`): a drained
engine gets no new request, and its running ones finish. With no engine known up, the ones marked
down are tried anyway (the probe may not have seen one come back).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import httpx

from jobs.engine_drains import normalize_url
from jobs.errors import QuotaExceeded, Unavailable
from jobs.store import ModelRef
from jobs.tenants import TenantRef
from service.embedded import EmbeddedEngines
from service.routing import choose_engine

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0
# what an engine that died or restarted does to a request: refuse the connection, or drop it unanswered
ENGINE_GONE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)


@dataclass
class Engine:
    """One engine: where it listens, which adapters it holds (by adapter id), what this process runs on it."""

    url: str
    loaded: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: int = 0
    up: bool = True


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


class _Released(httpx.AsyncByteStream):
    """An engine's response body that calls `release` once when it is closed (the request left the engine)."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]):
        self.stream, self._release = stream, release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class Engines:
    """Each base's engines: routes requests among them, loads adapters into them, watches their health."""

    def __init__(self, urls: dict[str, list[str]], embedded: EmbeddedEngines | None, *, timeout_s: float,
                 probe_interval_s: float = 2.0, load_factor: float = 1.25, min_load: int = 1,
                 drained: Callable[[], Iterable[str]] | None = None):
        """`drained`: reads the URLs drained for a restart (from the job store); called by the probe task."""
        self.embedded = embedded
        self.probe_interval_s, self.load_factor, self.min_load = probe_interval_s, load_factor, min_load
        self._read_drained = drained
        self.drained: set[str] = set()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._configured = {base: [Engine(normalize_url(u)) for u in base_urls] for base, base_urls in urls.items()}
        self._launched: dict[str, list[Engine]] = {}  # embedded engines, by base
        self._starting: dict[str, asyncio.Lock] = {}
        self._prober: asyncio.Task | None = None

    # -- which engines serve a base

    async def pool(self, model: ModelRef) -> list[Engine]:
        """The engines of the model's base (starting the embedded one if none is configured)."""
        engines = self._configured.get(model.base) or self._launched.get(model.base)
        if engines:
            return engines
        if self.embedded is None:
            raise Unavailable(f"No inference engine serves base model {model.base!r}", code="engine_unavailable")
        lock = self._starting.setdefault(model.base, asyncio.Lock())
        async with lock:
            if model.base not in self._launched:
                url = await self.embedded.launch(model.base, model.base_path)
                self._launched[model.base] = [Engine(normalize_url(url))]
            return self._launched[model.base]

    def by_base(self) -> Iterator[tuple[str, Engine]]:
        """Every engine this process knows, with its base: the configured ones and the embedded ones started."""
        for base, pool in (*self._configured.items(), *self._launched.items()):
            for engine in pool:
                yield base, engine

    def route(self, base: str, pool: list[Engine], key: str, tried: set[str]) -> Engine:
        """The engine for `key` among the pool's usable ones (`service.routing`); `tried` ones are left out."""
        open_ = [e for e in pool if e.url not in self.drained and e.url not in tried]
        if not open_:
            what = "is drained" if all(e.url in self.drained for e in pool) else "is unavailable"
            raise Unavailable(f"Every inference engine for {base!r} {what}; retry shortly", code="engine_unavailable")
        candidates = [e for e in open_ if e.up] or open_  # none known up: try them, the probe may lag
        by_url = {e.url: e for e in candidates}
        url = choose_engine(key, list(by_url), {e.url: e.in_flight for e in candidates},
                            load_factor=self.load_factor, min_load=self.min_load)
        return by_url[url]

    def mark_down(self, base: str, engine: Engine, reason: Exception | str) -> None:
        """The engine is gone: route around it, and forget what it held (it comes back empty)."""
        if engine.up:
            log.warning("engine %s for %s is down (%s)", engine.url, base, reason)
        engine.up = False
        engine.loaded.clear()
        if base in self._launched:  # an embedded engine is started again on the next request
            self._launched.pop(base, None)

    # -- forwarding

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
        """Free an adapter's memory on every engine of its base that holds it (it was deleted); best effort."""
        for engine in self._configured.get(base, []) + self._launched.get(base, []):
            if adapter_id not in engine.loaded:
                continue
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

    async def _open_on(self, engine: Engine, model: ModelRef, route: str, body: dict,
                       adapter_path: str | None) -> httpx.Response:
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

    async def open(self, model: ModelRef, route: str, body: dict, adapter_path: str | None) -> httpx.Response:
        """Send `body` (its `model` set to what the engine calls it) to the engine routing picks; the open response.

        An engine found gone is marked down and the next one in the route is tried. Raises
        `EngineError` for the engine's own 4xx/5xx, `Unavailable` when no engine can be reached.
        Closing the response ends the request's share of its engine's load.
        """
        pool = await self.pool(model)
        key = model.adapter.id if model.adapter is not None else str(body.get("user") or model.base)
        tried: set[str] = set()
        while True:
            engine = self.route(model.base, pool, key, tried)
            engine.in_flight += 1
            try:
                response = await self._open_on(engine, model, route, body, adapter_path)
            except ENGINE_GONE as exc:
                engine.in_flight -= 1
                self.mark_down(model.base, engine, exc)
                tried.add(engine.url)
                if all(e.url in tried or e.url in self.drained for e in pool):
                    raise _unavailable(model.base, exc) from exc
                continue
            except httpx.HTTPError as exc:
                engine.in_flight -= 1
                raise _unavailable(model.base, exc) from exc
            except BaseException:
                engine.in_flight -= 1
                raise
            engine.up = True

            def release(engine: Engine = engine) -> None:
                engine.in_flight -= 1

            response.stream = _Released(response.stream, release)
            return response

    # -- health and drains

    def start(self) -> None:
        """Start the probe task (in the serving event loop: the app's lifespan)."""
        if self._prober is None and self.probe_interval_s > 0:
            self._prober = asyncio.create_task(self._probe_forever(), name="engine-probe")

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe_once()
            except Exception:  # noqa: BLE001 — the probe must outlive a blip of the store or the network
                log.exception("engine probe failed")
            await asyncio.sleep(self.probe_interval_s)

    async def probe_once(self) -> None:
        """Re-read the drained engines, and mark each engine up or down by its `/health`."""
        if self._read_drained is not None:
            self.drained = {normalize_url(u) for u in await asyncio.to_thread(self._read_drained)}
        pools = list(self.by_base())
        answers = await asyncio.gather(*(self.client.get(f"{e.url}/health", timeout=PROBE_TIMEOUT_S)
                                         for _, e in pools), return_exceptions=True)
        for (base, engine), answer in zip(pools, answers, strict=True):
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                if not engine.up:
                    log.warning("engine %s for %s is up again", engine.url, base)
                engine.up = True
            elif isinstance(answer, httpx.Response):
                self.mark_down(base, engine, f"/health answered {answer.status_code}")
            elif isinstance(answer, ENGINE_GONE):
                self.mark_down(base, engine, answer)
            else:  # a timeout (a busy engine may answer late) or an odd error: no verdict
                log.warning("probing engine %s for %s: %r", engine.url, base, answer)

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
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
