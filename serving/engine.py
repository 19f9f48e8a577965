"""The engine: `Engine`, the synchronous core one thread drives, and `AsyncEngine`, its asyncio face.

`Engine.step()` is one iteration of continuous batching:

1. drain the inbox (new requests, aborts, adapters loaded or dropped, adapter reads finished);
2. admit waiting requests in fair order (`FairQueue`) while rows, the token budget and adapter slots
   allow; a request whose adapter is not in host memory starts a read on the loader thread and waits;
3. one forward pass over the decode tokens of the running rows and the prompts of the admitted ones;
4. sample, detokenize, check stops, emit a `Delta` per request, and free the rows of finished ones.

Every other thread talks to the engine through `submit`, `abort`, `put_adapter` and `drop_adapter`,
which only post to the inbox; all engine state belongs to the engine thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.errors import InputError
from serving.adapter_cache import AdapterCache, AdapterRef, AdapterWeights, read_adapter_weights
from serving.config import EngineConfig
from serving.detokenizer import IncrementalDetokenizer, OutputText
from serving.errors import NotFound, Overloaded
from serving.metrics import EngineMetrics
from serving.models import CausalLM, build_batch
from serving.sampling import Sampler, SamplingParams, TokenLogprobs
from serving.scheduler import FairQueue

log = logging.getLogger("loramill.engine")


@dataclass
class Delta:
    """What one step produced for one request. `finish_reason`: stop, length, abort or error."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


_arrivals = itertools.count()


class Sequence:
    """One request in the engine: prompt, parameters, adapter, and its generation state."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, adapter: AdapterRef | None,
                 user: str, emit: Callable[[Delta], None], tokenizer):
        self.id, self.prompt, self.params, self.adapter = request_id, prompt, params, adapter
        self.user = user
        self.adapter_key = adapter.id if adapter else 0
        self.emit = emit
        self.arrival = next(_arrivals)
        self.created = time.monotonic()
        self.output_ids: list[int] = []
        self.slot = 0
        self.finish_reason: str | None = None
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator().manual_seed(
                params.seed % 2**64 if params.seed is not None else random.getrandbits(63))
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = OutputText(params.stop)
        self.last_token_at: float | None = None

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the cache (all but the last sampled one)."""
        return len(self.prompt) + len(self.output_ids) - 1


class Engine:
    def __init__(self, model: CausalLM, tokenizer, config: EngineConfig, base_dir: Path,
                 metrics: EngineMetrics | None = None):
        self.model, self.tokenizer, self.config, self.base_dir = model, tokenizer, config, Path(base_dir)
        self.metrics = metrics or EngineMetrics()
        self.cache = AdapterCache(model, config, self.metrics)
        self.sampler = Sampler(model.lm_head.weight_t.shape[1])
        self.waiting = FairQueue()
        self.running: list[Sequence] = []  # index i = KV cache row i
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loramill-adapter-reader")
        self.reading: set[int] = set()
        self.live: set[int] = set()  # adapter ids registered and not dropped
        self.by_id: dict[str, Sequence] = {}
        eos = model_eos_ids(tokenizer, base_dir)
        self.eos_ids = frozenset(eos)

    @property
    def vocab_size(self) -> int:
        return self.sampler.vocab_size

    # --- any thread ---------------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse what cannot run: an empty or too long prompt, too many tokens, bad sampling values."""
        limit = self.model.max_model_len
        if not prompt:
            raise InputError("the prompt is empty", param="prompt", code="invalid_value")
        if len(prompt) >= limit:
            raise InputError(f"the prompt has {len(prompt)} tokens; this model's context is {limit} tokens and "
                             f"leaves no room to generate", param="prompt", code="context_length_exceeded")
        if max(prompt) >= self.vocab_size or min(prompt) < 0:
            raise InputError(f"the prompt has token ids outside the vocabulary of {self.vocab_size}", param="prompt")
        params.validate(self.vocab_size)
        if len(prompt) + params.max_tokens > limit:
            raise InputError(f"max_tokens ({params.max_tokens}) plus the prompt's {len(prompt)} tokens exceed this "
                             f"model's context of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        if len(self.waiting) >= self.config.max_waiting:
            raise Overloaded(f"the engine has {self.config.max_waiting} requests waiting; retry later")

    def read_adapter(self, ref: AdapterRef) -> AdapterWeights:
        """Read and convert an adapter (blocking: call it on `self.loader`)."""
        weights = read_adapter_weights(ref, self.model, self.base_dir, self.config)
        self.metrics.adapter_reads.inc()
        return weights

    def submit(self, seq: Sequence) -> None:
        self.inbox.put(("add", seq))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def put_adapter(self, ref: AdapterRef, weights: AdapterWeights) -> None:
        self.inbox.put(("adapter", ref, weights))

    def drop_adapter(self, ref: AdapterRef) -> None:
        self.inbox.put(("drop", ref))

    # --- engine thread ------------------------------------------------------------------------
    def step(self, timeout: float = 0.0) -> bool:
        """One scheduling iteration; with nothing to run, wait up to `timeout` for the inbox. True if it ran."""
        self._drain()
        admitted = self._admit()
        if not self.running and not admitted:
            if timeout > 0:
                try:
                    self._handle(self.inbox.get(timeout=timeout))
                except queue.Empty:
                    pass
            return False
        try:
            self._forward(admitted)
        except Exception as exc:  # noqa: BLE001 — a failed step fails its requests, not the engine
            log.exception("engine step failed")
            for seq in self.running + [s for s in admitted if s not in self.running]:
                self._release(seq)
                self._finish_with_error(seq, f"engine step failed: {type(exc).__name__}")
            self.running = []
        self._update_gauges()
        return True

    def run_until_idle(self) -> None:
        """Step until nothing runs, waits or loads (for tests and benchmarks driving the engine directly)."""
        while True:
            ran = self.step(timeout=0.01)
            if not ran and not self.running and not len(self.waiting) and not self.reading and self.inbox.empty():
                return

    def _drain(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            seq = message[1]
            self.by_id[seq.id] = seq
            self.waiting.push(seq)
        elif kind == "abort":
            seq = self.by_id.get(message[1])
            if seq is not None:
                self._abort(seq)
        elif kind == "adapter":
            ref, weights = message[1], message[2]
            self.live.add(ref.id)
            self.cache.put_host(ref.id, weights)
        elif kind == "drop":
            self.live.discard(message[1].id)
            self.cache.drop(message[1].id)
        elif kind == "read":
            ref, future = message[1], message[2]
            self.reading.discard(ref.id)
            if future.exception() is None:
                self.cache.put_host(ref.id, future.result())
            else:
                error = future.exception()
                for seq in self.waiting.remove_adapter(ref.id):
                    self._finish_with_error(seq, f"adapter '{ref.name}' could not be read: {error}")
        self._update_gauges()

    def _read(self, ref: AdapterRef) -> None:
        if ref.id in self.reading:
            return
        self.reading.add(ref.id)
        future: Future = self.loader.submit(self.read_adapter, ref)
        future.add_done_callback(lambda f: self.inbox.put(("read", ref, f)))

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        rows = self.config.max_num_seqs - len(self.running)
        budget = self.config.max_num_batched_tokens - len(self.running)
        slot_blocked = False  # the fairest request waits for a slot: admit nothing else that needs one
        while rows > 0 and len(self.waiting):
            picked = None
            for seq in self.waiting.heads():
                if len(seq.prompt) > budget or (slot_blocked and seq.adapter is not None):
                    continue
                if seq.adapter is not None:
                    slot = self.cache.acquire(seq.adapter.id)
                    if slot is None:
                        if self.cache.on_host(seq.adapter.id):
                            slot_blocked = True
                        else:
                            self._read(seq.adapter)
                        continue
                    seq.slot = slot
                picked = seq
                break
            if picked is None:
                break
            self.waiting.admitted(picked)
            admitted.append(picked)
            rows -= 1
            budget -= len(picked.prompt)
            self.metrics.prompt_tokens.inc(len(picked.prompt))
        return admitted

    def _forward(self, admitted: list[Sequence]) -> None:
        model = self.model
        decodes = [(seq.output_ids[-1], seq.cached, seq.slot) for seq in self.running]
        start = len(self.running)
        prefills = [(start + i, seq.prompt, seq.slot) for i, seq in enumerate(admitted)]
        batch = build_batch(decodes, prefills, device=model.device, dtype=model.dtype)
        with torch.inference_mode():
            logits = model.forward(batch)
        self.running.extend(admitted)
        tokens, logprobs = self.sampler.sample(logits, self.running)
        now = time.monotonic()
        finished = []
        for i, (seq, token, lp) in enumerate(zip(self.running, tokens, logprobs)):
            self._append(seq, token, lp, now)
            if seq.finish_reason:
                finished.append(i)
        for i in reversed(finished):
            self._free_row(i)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float) -> None:
        seq.output_ids.append(token)
        self.metrics.generated_tokens.inc()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.created)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        elif seq.text.add(seq.detokenizer.add(token)):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason and not seq.text.stopped and seq.text.add(seq.detokenizer.flush()):
            seq.finish_reason = "stop"
        final = seq.finish_reason is not None
        seq.emit(Delta(seq.text.emit(final), [token], [lp] if lp else [], seq.finish_reason,
                       len(seq.prompt), len(seq.output_ids)))
        if final:
            self.metrics.requests.labels(seq.finish_reason).inc()
            self.by_id.pop(seq.id, None)

    def _release(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.cache.release(seq.slot, seq.adapter.id, live=seq.adapter.id in self.live)

    def _free_row(self, row: int) -> None:
        self._release(self.running[row])
        last = len(self.running) - 1
        if row != last:
            self.model.kv.move_row(last, row, self.running[last].cached)
            self.running[row] = self.running[last]
        self.running.pop()

    def _abort(self, seq: Sequence) -> None:
        if seq.finish_reason:
            return
        if not self.waiting.remove(seq):
            if seq not in self.running:
                return
            self._free_row(self.running.index(seq))
        seq.finish_reason = "abort"
        self.by_id.pop(seq.id, None)
        self.metrics.requests.labels("abort").inc()
        seq.emit(Delta("", [], finish_reason="abort", prompt_tokens=len(seq.prompt),
                       completion_tokens=len(seq.output_ids)))

    def _finish_with_error(self, seq: Sequence, message: str) -> None:
        if seq.finish_reason:
            return
        seq.finish_reason = "error"
        self.by_id.pop(seq.id, None)
        self.metrics.requests.labels("error").inc()
        seq.emit(Delta("", [], finish_reason="error", prompt_tokens=len(seq.prompt),
                       completion_tokens=len(seq.output_ids), error=message))

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))


def model_eos_ids(tokenizer, base_dir: Path) -> set[int]:
    """End-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    import json

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    path = Path(base_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class AsyncEngine:
    """The engine on its own thread, with the adapter registry (names -> `AdapterRef`) for asyncio callers."""

    def __init__(self, engine: Engine, served_name: str):
        self.engine, self.served_name = engine, served_name
        self.adapters: dict[str, AdapterRef] = {}
        self._ids = itertools.count(1)
        self._locks: dict[str, asyncio.Lock] = {}
        self._requests = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loramill-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.engine.step(timeout=0.1)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.loader.shutdown(wait=False, cancel_futures=True)

    def resolve(self, model: str | None) -> AdapterRef | None:
        """The adapter a request's `model` names; None for the base model; `NotFound` otherwise."""
        if model is None or model == self.served_name:
            return None
        ref = self.adapters.get(model)
        if ref is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return ref

    async def load_adapter(self, name: str, path: str, load_inplace: bool = False) -> None:
        """vLLM's `/v1/load_lora_adapter`: read and check the adapter, then register `name`."""
        if not name or not path:
            raise InputError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if name == self.served_name:
            raise InputError(f"'{name}' is the base model's name", param="lora_name")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.adapters.get(name)
            if old is not None and not load_inplace:
                raise InputError(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                                 f"in place, set 'load_inplace' to True.", param="lora_name")
            ref = AdapterRef(next(self._ids), name, Path(path))
            loop = asyncio.get_running_loop()
            weights = await loop.run_in_executor(self.engine.loader, self.engine.read_adapter, ref)
            self.adapters[name] = ref
            self.engine.put_adapter(ref, weights)
            if old is not None:
                self.engine.drop_adapter(old)

    async def unload_adapter(self, name: str) -> None:
        if not name:
            raise InputError("'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            ref = self.adapters.pop(name, None)
            if ref is None:
                raise NotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            self.engine.drop_adapter(ref)
        self._locks.pop(name, None)

    def generate(self, prompt: list[int], params: SamplingParams, adapter: AdapterRef | None,
                 user: str | None) -> AsyncIterator[Delta]:
        """Check a request now (raising `InputError`), then return its stream: a `Delta` per step until one
        has a `finish_reason`. Closing the stream early (a client that went away) aborts the request."""
        self.engine.check(prompt, params)
        return self._stream(prompt, params, adapter, user or "")

    async def _stream(self, prompt: list[int], params: SamplingParams, adapter: AdapterRef | None,
                      user: str) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        seq = Sequence(f"req-{next(self._requests)}", prompt, params, adapter, user,
                       lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d), self.engine.tokenizer)
        self.engine.submit(seq)
        done = False
        try:
            while not done:
                delta = await deltas.get()
                done = delta.finish_reason is not None
                yield delta
        finally:
            if not done:
                self.engine.abort(seq.id)
