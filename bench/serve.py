"""Multi-adapter serving throughput: the loramill engine against transformers and PEFT, in one run.

    .venv/bin/python bench/serve.py [--out bench/out] [--rounds 3] [--serial-requests 16]
                                    [--rate 2] [--http-requests 32] [--vllm-python PATH] [--json FILE]

The workload (issue 10): a 25.6 M-parameter Llama with the byte vocabulary (`loramill base create
--layers 8 --hidden 512 --heads 8 --kv-heads 8 --intermediate 1376`), 16 rank-8 PEFT adapters on all
seven projections (random A and B, so every adapter changes the outputs), 64 requests of 32 prompt
tokens x 32 new tokens, greedy, end-of-sequence ignored so every request makes exactly 32 tokens,
batch 16, request i asking adapter i mod 16. Everything is float32 on the CPU with torch's default
thread count, the same for every peer.

A peer is a function `(prompts, adapters, batch, new_tokens) -> (tokens, seconds[, cpu_seconds])`:
`prompts` are token-id lists, `adapters[i]` the adapter directory request i asks for (None: the base
model). It loads its model and adapters and warms up untimed, then returns the tokens generated and
the seconds spent generating them (loading excluded); in-process peers also return the process's CPU
seconds over the same span. Peers measured:

    engine          loramill's engine in-process (`serving.engine.Engine`), all 64 requests submitted
                    at once, `max_num_seqs` = batch, `max_loras` 16, `max_lora_rank` 8
    base            (a) the base model alone, transformers `generate`, batches of `batch`
    peft-serial     (b) PEFT, `set_adapter` then `generate`, one request at a time (only the first
                    --serial-requests requests: its tokens/s does not depend on how many)
    peft-mixed      (c) PEFT's mixed batch, `generate(..., adapter_names=[...])`, batches of `batch`
    vllm            with --vllm-python PATH and a `bench/vllm_peer.py`: `bench.vllm_peer.measure(prompts,
                    adapters, batch, new_tokens, base=..., python=PATH)`, the same contract

Peers run in rounds, interleaved (a, c, engine, ...), so load from other processes on the machine
hits each alike; ratios are taken per round and reported as median (min-max). On a shared machine
the load changes within a round, so ratios of output tokens per CPU-second (in-process peers) are
printed too: with one thread (--threads 1) they barely depend on how much of a core a peer got.
Targets: engine >= 0.85x (a) and >= 2.4x (c).

Also printed, for the engine: output tokens/s as the number of distinct adapters among the 64
requests grows (1, 4, 16, 64, with 16 device slots: 64 makes requests wait for slots, all adapters
in host memory); adapter cold-load p50 (reading, checking and converting an adapter from its
directory, page cache warm; and copying it into a device slot); and over HTTP (`loramill engine` as a
subprocess, streaming `/v1/completions` sent open-loop at --rate requests/s), time to first token
and inter-token latency p50/p99. The HTTP requests ask `logprobs: 0` so that every token arrives as
its own chunk (a byte token that ends inside a UTF-8 character has no text of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.procs import stop  # noqa: E402

BIN = Path(sys.executable).parent
BASE_SHAPE = dict(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1376)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
SLOTS = 16
REQUESTS, PROMPT_TOKENS, NEW_TOKENS, BATCH = 64, 32, 32, 16
ADAPTER_COUNTS = (1, 4, 16, 64)
TARGET_VS_BASE, TARGET_VS_MIXED = 0.85, 2.4

Peer = Callable[[list[list[int]], list[Path | None], int, int], tuple]  # (tokens, seconds[, cpu_seconds])


class Clock:
    """Wall and process CPU seconds since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# --- inputs -----------------------------------------------------------------------------------
def ensure_base(out: Path) -> Path:
    base = out / "serve-base"
    if not (base / "config.json").exists():
        args = [str(BIN / "loramill"), "base", "create", str(base), "--arch", "llama", "--overwrite"]
        for key, value in BASE_SHAPE.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return base


def ensure_adapters(out: Path, base: Path, count: int) -> list[Path]:
    """`count` PEFT adapters (rank 8, alpha 16, all seven projections), A and B ~ N(0, 0.05²) seeded by index.

    Written by PEFT's own `save_pretrained` into a temporary directory, then renamed.
    """
    dirs = [out / f"serve-adapter-{i:02d}" for i in range(count)]
    missing = [d for d in dirs if not (d / "adapter_model.safetensors").exists()]
    if missing:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                               LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
        for d in missing:
            generator = torch.Generator().manual_seed(dirs.index(d))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            tmp = d.with_name(d.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
    return dirs


def make_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Printable ASCII bytes (the byte vocabulary's ids are the bytes)."""
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) for _ in range(length)] for _ in range(n)]


# --- peers ------------------------------------------------------------------------------------
def _hf_base(base: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every request makes exactly new_tokens tokens
    model.generation_config.pad_token_id = 0
    return model


def _generate(model, prompts: list[list[int]], new_tokens: int, **kwargs) -> int:
    """One greedy `generate` over equal-length prompts (no padding); returns the tokens generated."""
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].numel()


def _batches(n: int, batch: int) -> list[range]:
    return [range(i, min(i + batch, n)) for i in range(0, n, batch)]


def peer_base(base: Path, prompts, adapters, batch: int, new_tokens: int) -> tuple[int, float]:
    """(a) The base model alone (adapters ignored), transformers `generate`, `batch` requests at a time."""
    model = _hf_base(base)
    _generate(model, prompts[:batch], 2)
    clock = Clock()
    tokens = sum(_generate(model, [prompts[i] for i in rows], new_tokens) for rows in _batches(len(prompts), batch))
    return (tokens, *clock.since())


def _peft(base: Path, adapters) -> tuple[object, dict]:
    from peft import PeftModel

    distinct = list(dict.fromkeys(a for a in adapters if a is not None))
    names = {a: f"a{i}" for i, a in enumerate(distinct)}
    model = PeftModel.from_pretrained(_hf_base(base), str(distinct[0]), adapter_name=names[distinct[0]])
    for a in distinct[1:]:
        model.load_adapter(str(a), adapter_name=names[a])
    return model.eval(), names


def peer_peft_serial(base: Path, prompts, adapters, batch: int, new_tokens: int) -> tuple[int, float]:
    """(b) PEFT, one request at a time: `set_adapter` to the request's adapter, then `generate`."""
    model, names = _peft(base, adapters)
    _generate(model, prompts[:1], 2)
    tokens, spent, cpu = 0, 0.0, 0.0
    for prompt, adapter in zip(prompts, adapters):
        clock = Clock()
        if adapter is None:
            with model.disable_adapter():
                tokens += _generate(model, [prompt], new_tokens)
        else:
            model.set_adapter(names[adapter])
            tokens += _generate(model, [prompt], new_tokens)
        wall, used = clock.since()
        spent, cpu = spent + wall, cpu + used
    return tokens, spent, cpu


def peer_peft_mixed(base: Path, prompts, adapters, batch: int, new_tokens: int) -> tuple[int, float]:
    """(c) PEFT's mixed batch: `generate(..., adapter_names=[one per request])`, `batch` requests at a time."""
    model, names = _peft(base, adapters)
    labels = [names[a] if a is not None else "__base__" for a in adapters]
    _generate(model, prompts[:batch], 2, adapter_names=labels[:batch])
    clock = Clock()
    tokens = sum(_generate(model, [prompts[i] for i in rows], new_tokens, adapter_names=[labels[i] for i in rows])
                 for rows in _batches(len(prompts), batch))
    return (tokens, *clock.since())


def _engine(base: Path, adapters, batch: int):
    """An in-process engine over `base` with every distinct adapter read into host memory."""
    from transformers import AutoTokenizer

    from serving.adapter_cache import AdapterRef
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.models import load_model

    distinct = list(dict.fromkeys(a for a in adapters if a is not None))
    config = EngineConfig(max_loras=SLOTS, max_cpu_loras=max(SLOTS, len(distinct)), max_lora_rank=RANK,
                          max_num_seqs=batch, max_model_len=PROMPT_TOKENS + NEW_TOKENS + 64, dtype="float32",
                          device="cpu")
    engine = Engine(load_model(base, config), AutoTokenizer.from_pretrained(str(base)), config, base)
    refs = {}
    for i, path in enumerate(distinct, start=1):
        refs[path] = AdapterRef(i, f"adapter-{i}", Path(path))
        engine.put_adapter(refs[path], engine.read_adapter(refs[path]))
    return engine, refs


def _engine_run(engine, refs, prompts, adapters, new_tokens: int) -> list[list]:
    from serving.engine import Sequence
    from serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    outputs: list[list] = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        deltas: list = []
        outputs.append(deltas)
        engine.submit(Sequence(f"bench-{i}", prompt, params, refs.get(adapter), "", deltas.append, engine.tokenizer))
    engine.run_until_idle()
    return outputs


def peer_engine(base: Path, prompts, adapters, batch: int, new_tokens: int) -> tuple[int, float]:
    """loramill's engine in-process: all requests submitted at once, continuous batching over `batch` rows."""
    engine, refs = _engine(base, adapters, batch)
    warm = list(dict.fromkeys(adapters))[:SLOTS]  # fill the slots and warm every code path, untimed
    _engine_run(engine, refs, prompts[:len(warm)], warm, 2)
    clock = Clock()
    outputs = _engine_run(engine, refs, prompts, adapters, new_tokens)
    return (sum(len(d.token_ids) for deltas in outputs for d in deltas), *clock.since())


def optional_peers(base: Path, vllm_python: str | None) -> dict[str, Peer]:
    """Peers written elsewhere: `bench/vllm_peer.py`'s `measure`, when it exists and --vllm-python is given."""
    if vllm_python is None:
        return {}
    if importlib.util.find_spec("bench.vllm_peer") is None:
        raise SystemExit("error: --vllm-python needs bench/vllm_peer.py, which this checkout does not have")
    from bench import vllm_peer

    return {"vllm": partial(vllm_peer.measure, base=base, python=vllm_python)}


# --- engine-only figures ----------------------------------------------------------------------
def adapter_scaling(base: Path, dirs: list[Path], prompts) -> dict[int, float]:
    """Engine tokens/s with 1, 4, 16, 64 distinct adapters among the requests (16 slots)."""
    result = {}
    for count in ADAPTER_COUNTS:
        adapters = [dirs[i % count] for i in range(len(prompts))]
        tokens, seconds, _ = peer_engine(base, prompts, adapters, BATCH, NEW_TOKENS)
        result[count] = tokens / seconds
    return result


def cold_load(base: Path, dirs: list[Path]) -> dict[str, float]:
    """p50 seconds: read + check + convert an adapter (host), and copy it into a free device slot."""
    from serving.adapter_cache import AdapterRef

    engine, _ = _engine(base, [], BATCH)
    reads, copies = [], []
    for i, path in enumerate(dirs[:SLOTS], start=1):
        ref = AdapterRef(i, f"cold-{i}", path)
        started = time.perf_counter()
        weights = engine.read_adapter(ref)
        reads.append(time.perf_counter() - started)
        engine.cache.put_host(ref.id, weights)
        started = time.perf_counter()
        slot = engine.cache.acquire(ref.id)
        copies.append(time.perf_counter() - started)
        engine.cache.release(slot, ref.id, live=True)
    return {"read_p50_s": statistics.median(reads), "slot_copy_p50_s": statistics.median(copies)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _fire(url: str, prompts, names: list[str], rate: float) -> tuple[list[float], list[float], int]:
    """Streaming completions sent open-loop at `rate`/s; returns (TTFTs, inter-token gaps, failures)."""
    import httpx

    ttfts, gaps, failures = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        async def one(at: float, prompt: list[int], model: str) -> None:
            nonlocal failures
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            sent = time.perf_counter()
            body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
                    "ignore_eos": True, "logprobs": 0}
            arrivals = []
            try:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        failures += 1
                        return
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            if json.loads(line[6:]).get("choices"):
                                arrivals.append(time.perf_counter())
            except httpx.HTTPError:
                failures += 1
                return
            if len(arrivals) != NEW_TOKENS:
                failures += 1
                return
            ttfts.append(arrivals[0] - sent)
            gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))

        t0 = time.perf_counter() + 0.2
        await asyncio.gather(*(one(t0 + i / rate, p, m) for i, (p, m) in enumerate(zip(prompts, names))))
    return ttfts, gaps, failures


def http_latency(base: Path, dirs: list[Path], prompts, rate: float) -> dict[str, float]:
    """`loramill engine` as a subprocess; TTFT and ITL p50/p99 at a fixed request rate."""
    import httpx

    cmd = [str(BIN / "loramill"), "engine", "--base", str(base), "--port", "0", "--served-model-name", "base",
           "--max-loras", str(SLOTS), "--max-lora-rank", str(RANK), "--max-num-seqs", str(BATCH),
           "--max-model-len", str(PROMPT_TOKENS + NEW_TOKENS + 64), "--dtype", "float32", "--device", "cpu",
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"ready on (http://\S+)", line)
        if not match:
            raise SystemExit(f"error: loramill engine did not start (exit {proc.wait()})")
        url = match[1]
        for i, path in enumerate(dirs[:SLOTS]):
            httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": str(path)},
                       timeout=60).raise_for_status()
        names = [f"a{i % SLOTS}" for i in range(len(prompts))]
        asyncio.run(_fire(url, prompts[:SLOTS], names[:SLOTS], rate=100))  # warm: every adapter into a slot
        ttfts, gaps, failures = asyncio.run(_fire(url, prompts, names, rate))
    finally:
        stop(proc)
    return {"requests": len(prompts), "rate": rate, "failures": failures,
            "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
            "itl_p50_s": _percentile(gaps, 0.5), "itl_p99_s": _percentile(gaps, 0.99)}


# --- report -----------------------------------------------------------------------------------
def _spread(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}-{fmt.format(x['max'])})"


def cpu_model() -> str:
    """The CPU's model name (kernel speeds, and so these ratios, differ between CPU makers)."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every batched peer")
    parser.add_argument("--serial-requests", type=int, default=16, help="requests (b) runs, one at a time")
    parser.add_argument("--rate", type=float, default=2.0, help="HTTP requests per second")
    parser.add_argument("--http-requests", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: serial,scaling,cold,http")
    parser.add_argument("--threads", type=int, help="torch CPU threads for every in-process peer (default: torch's)")
    parser.add_argument("--vllm-python", help="a Python with vLLM, for bench/vllm_peer.py's peer")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base = ensure_base(args.out)
    dirs = ensure_adapters(args.out, base, max(ADAPTER_COUNTS))
    prompts = make_prompts(REQUESTS, PROMPT_TOKENS)
    adapters = [dirs[i % SLOTS] for i in range(REQUESTS)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}", flush=True)

    peers: dict[str, Peer] = {"base": partial(peer_base, base), "peft-mixed": partial(peer_peft_mixed, base),
                              "engine": partial(peer_engine, base), **optional_peers(base, args.vllm_python)}
    load_start = load_average()
    rates: dict[str, list[float]] = {name: [] for name in peers}
    cpu_rates: dict[str, list[float]] = {name: [] for name in peers}
    for r in range(args.rounds):
        order = list(peers)[r % len(peers):] + list(peers)[:r % len(peers)]  # who goes first rotates
        for name in order:
            tokens, seconds, *cpu = peers[name](prompts, adapters, BATCH, NEW_TOKENS)
            rates[name].append(tokens / seconds)
            if cpu:
                cpu_rates[name].append(tokens / cpu[0])
            print(f"  round {r + 1} {name:<11} {tokens} tokens in {seconds:.2f} s: {tokens / seconds:7.1f} tok/s"
                  + (f", {tokens / cpu[0]:7.1f} tok per CPU-s" if cpu else "") + f" (load {load_average()})", flush=True)

    def over(table: dict[str, list[float]]) -> dict:
        return {k: _spread(e / p for e, p in zip(table["engine"], v, strict=True))
                for k, v in table.items() if k != "engine" and len(v) == len(table["engine"])}

    from serving.layers import decode_kernels

    results: dict = {"load_average_start": load_start, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                     "decode_kernels": {f"{d_in}x{d_out}": k for (d_in, d_out, _, _), k in decode_kernels().items()},
                     "tokens_per_s": {k: _spread(v) for k, v in rates.items()},
                     "tokens_per_cpu_s": {k: _spread(v) for k, v in cpu_rates.items() if v},
                     "engine_over": over(rates), "engine_over_per_cpu_s": over(cpu_rates)}
    if "serial" not in skip:
        n = args.serial_requests
        tokens, seconds, cpu = peer_peft_serial(base, prompts[:n], adapters[:n], 1, NEW_TOKENS)
        results["tokens_per_s"]["peft-serial"] = _spread([tokens / seconds])
        results["tokens_per_cpu_s"]["peft-serial"] = _spread([tokens / cpu])
        print(f"  peft-serial {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s, "
              f"{tokens / cpu:.1f} tok per CPU-s", flush=True)
    if "scaling" not in skip:
        results["adapter_scaling_tokens_per_s"] = adapter_scaling(base, dirs, prompts)
    if "cold" not in skip:
        results["cold_load"] = cold_load(base, dirs)
    if "http" not in skip:
        http_prompts = make_prompts(args.http_requests, PROMPT_TOKENS, seed=1)
        results["http"] = http_latency(base, dirs, http_prompts, args.rate)
    results["load_average_end"] = load_average()
    report(results)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.json)


def report(results: dict) -> None:
    t, over, per_cpu = results["tokens_per_s"], results["engine_over"], results["engine_over_per_cpu_s"]
    print(f"\n{REQUESTS} requests x {PROMPT_TOKENS} prompt + {NEW_TOKENS} new tokens, greedy, batch {BATCH}, "
          f"{SLOTS} rank-{RANK} adapters, {results['threads']} torch threads; output tokens/s, median (min-max) "
          f"over rounds; load average {results['load_average_start']} -> {results['load_average_end']}")
    print(f"  CPU: {results['cpu']}; the engine's decode GEMM kernels (serving.layers.BaseMatmul): "
          + ", ".join(f"{shape} {kernel}" for shape, kernel in results["decode_kernels"].items()))
    labels = {"engine": "loramill engine", "base": "(a) base alone, transformers generate",
              "peft-serial": "(b) PEFT set_adapter, one at a time", "peft-mixed": "(c) PEFT mixed batch",
              "vllm": "vLLM (bench/vllm_peer.py)"}
    for name, spread in t.items():
        cpu = results["tokens_per_cpu_s"].get(name)
        print(f"  {labels.get(name, name):<40} {_fmt(spread, '{:.1f}')}"
              + (f"   per CPU-second {_fmt(cpu, '{:.1f}')}" if cpu else ""))
    for name, ratio in over.items():
        target = {"base": f" (target >= {TARGET_VS_BASE})", "peft-mixed": f" (target >= {TARGET_VS_MIXED})"}.get(name, "")
        cpu = f"; per CPU-second {_fmt(per_cpu[name])}x" if name in per_cpu else ""
        print(f"  engine / {labels.get(name, name):<31} {_fmt(ratio)}x{cpu}{target}")
    if "peft-serial" in t:
        print(f"  engine / (b) PEFT serial                 {t['engine']['median'] / t['peft-serial']['median']:.2f}x; "
              f"per CPU-second {results['tokens_per_cpu_s']['engine']['median'] / results['tokens_per_cpu_s']['peft-serial']['median']:.2f}x "
              f"(medians)")
    if "adapter_scaling_tokens_per_s" in results:
        scaling = ", ".join(f"{k}: {v:.1f}" for k, v in results["adapter_scaling_tokens_per_s"].items())
        print(f"  engine tok/s by distinct adapters ({SLOTS} slots): {scaling}")
    if "cold_load" in results:
        c = results["cold_load"]
        print(f"  adapter cold load p50: read+convert {c['read_p50_s'] * 1e3:.1f} ms, "
              f"copy into a slot {c['slot_copy_p50_s'] * 1e3:.2f} ms")
    if "http" in results:
        h = results["http"]
        print(f"  HTTP, {h['requests']} streaming requests at {h['rate']:g}/s ({h['failures']} failed): "
              f"TTFT p50 {h['ttft_p50_s'] * 1e3:.0f} ms, p99 {h['ttft_p99_s'] * 1e3:.0f} ms; "
              f"ITL p50 {h['itl_p50_s'] * 1e3:.1f} ms, p99 {h['itl_p99_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
