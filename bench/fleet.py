"""Capacity of one engine and of one API process in front of it (the README's capacity figures).

    python bench/fleet.py [--requests 64] [--tokens 32] [--adapters 16] [--concurrency 16]

Makes a ~23 M-parameter Llama (8 layers, 512 wide, byte-level tokenizer) and `--adapters` PEFT
adapters of rank 8 on every projection, starts one `loramill engine` (fp32, CPU unless CUDA is
present) and one `loramill serve` (API only: a Redis broker, SQLite, the engine in
LORAMILL_ENGINE_URLS), and measures, in the same run:

1. the engine alone: `--requests` completions of `--tokens` tokens (`ignore_eos`), `--concurrency`
   at a time, spread over the adapters, then the same requests on the base alone; prints tokens/s
   of each and their ratio, and the engine's RSS;
2. the same adapter requests through the API (auth, name resolution, routing, relaying): tokens/s
   and the ratio to the engine direct;
3. one-token completions through the API and direct, requests/s and ratio, and the API process's
   CPU time per forwarded request (from /proc; the figure that decides how many requests one API
   process holds, and far steadier than throughput on a shared machine); its RSS after the load.

On a machine where the engine, the API and this load generator share the cores, the API's
throughput ratio mostly measures that sharing; the CPU per request does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.api import cpu_seconds  # noqa: E402
from bench.procs import free_port, free_redis_url, release_redis, stop, wait_http  # noqa: E402

PROMPT = "Hello world, this is"
LOOP = [sys.executable, "-c", "from loramill.cli import main; main()"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, root: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(str(root / f"adapter-{i}"))
        paths.append(root / f"adapter-{i}")
    return paths


async def run(url: str, headers: dict, models: list[str], requests: int, tokens: int, concurrency: int) -> float:
    """Seconds for `requests` completions of `tokens` tokens each, `concurrency` at a time, round-robin on models."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        async def one(i: int) -> None:
            async with gate:
                response = await client.post("/v1/completions", json={
                    "model": models[i % len(models)], "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True})
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == tokens

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    from adapters.basemodel import BaseModelSpec, create_base_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = create_base_model(root / "base", BaseModelSpec(arch="llama", layers=8, hidden=512, heads=8, kv_heads=4,
                                                              intermediate=1376, vocab=320))
        adapters = make_adapters(base, root, args.adapters)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
        engine = subprocess.Popen([*LOOP, "engine", "--base", str(base), "--served-model-name", "base", "--port", "0",
                                   "--max-loras", str(args.adapters), "--max-lora-rank", "8", "--max-num-seqs",
                                   str(args.concurrency), "--max-model-len", "256", "--dtype", "float32"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = engine.stdout.readline()
        engine_url = line.split()[4]
        print(line.strip())
        broker = free_redis_url()
        data = root / "data"
        env.update({"LORAMILL_DATA_DIR": str(data), "LORAMILL_BROKER_URL": broker,
                    "LORAMILL_ENGINE_URLS": json.dumps({"base": engine_url}), "LORAMILL_EMBEDDED_ENGINES": "false",
                    "LORAMILL_REQUESTS_PER_MINUTE": "0", "LORAMILL_MAX_CONCURRENT_GENERATIONS": "0"})
        cli = [*LOOP]
        key = subprocess.run([*cli, "tenant", "create", "bench"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
        subprocess.run([*cli, "model", "add", "base", str(base)], env=env, capture_output=True, check=True)
        port = free_port()
        api = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        api_url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{api_url}/readyz", api, timeout_s=120)
            auth = {"Authorization": f"Bearer {key}"}
            ids = []
            for path in adapters:
                files = [("file", (name, (path / name).read_bytes())) for name in
                         ("adapter_config.json", "adapter_model.safetensors")]
                response = httpx.post(f"{api_url}/v1/adapters", headers=auth, data={"base_model": "base"},
                                      files=files, timeout=60)
                assert response.status_code == 200, response.text
                ids.append(response.json()["id"])
            api_rss_idle = rss_mb(api.pid)
            # warm: every adapter loaded into the engine through the API (its id is the engine's name for it)
            asyncio.run(run(api_url, auth, ids, len(ids), 1, args.concurrency))
            n, t, c = args.requests, args.tokens, args.concurrency
            direct = asyncio.run(run(engine_url, {}, ids, n, t, c))
            alone = asyncio.run(run(engine_url, {}, ["base"], n, t, c))
            through = asyncio.run(run(api_url, auth, ids, n, t, c))
            small_n = 4 * n
            direct_small = asyncio.run(run(engine_url, {}, ids, small_n, 1, c))
            cpu_before = cpu_seconds(api.pid)
            through_small = asyncio.run(run(api_url, auth, ids, small_n, 1, c))
            api_cpu_ms = (cpu_seconds(api.pid) - cpu_before) / small_n * 1000
            print(f"load average {os.getloadavg()[0]:.1f}; {n} requests x {t} tokens, {c} at a time, "
                  f"{len(ids)} adapters (rank 8, every projection)")
            print(f"engine, {len(ids)} adapters: {n * t / direct:7.1f} tok/s | base alone: {n * t / alone:7.1f} tok/s"
                  f" | ratio {alone / direct:.2f}x of base alone | engine RSS {rss_mb(engine.pid):.0f} MB")
            print(f"through the API:   {n * t / through:7.1f} tok/s | {direct / through:.2f}x of the engine direct")
            print(f"1-token requests:  API {small_n / through_small:6.1f} req/s | direct {small_n / direct_small:6.1f} "
                  f"req/s | ratio {direct_small / through_small:.2f}x")
            print(f"API process: {api_cpu_ms:.1f} ms CPU per forwarded request (so ~{1000 / api_cpu_ms:.0f} req/s "
                  f"per core); RSS {api_rss_idle:.0f} MB idle, {rss_mb(api.pid):.0f} MB after the load")
        finally:
            stop(api)
            stop(engine)
            release_redis(broker)


if __name__ == "__main__":
    main()
