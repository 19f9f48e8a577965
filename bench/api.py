"""Job-creation latency at a fixed request rate on loopback.

    python bench/api.py [--rate 100] [--seconds 10] [--database-url URL] [--broker-url URL]

Starts the API (uvicorn, one process) over a temporary data directory with the real broker
(Redis by default: an empty Redis database number) and, unless `--database-url` is given, SQLite.
Makes a tenant, a tiny base model and a training file, then sends `POST /v1/fine_tuning/jobs`
open-loop at `--rate` requests/s (request i is sent at t0 + i/rate whatever earlier ones are
doing, so a slow server cannot slow the clock) and prints p50/p90/p99/max latency. Nothing
consumes the queue: this measures submission (auth, checks, one commit, enqueue), not training.
It also prints the API process's CPU time per request (user + system, from /proc, over the
timed requests): on a 2-core machine shared with the database, Redis and this load generator,
that figure decides where the server saturates, and it varies far less between runs than p99.
Target (design.md): p99 < 50 ms at 100 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procs import free_port, free_redis_url, release_redis, stop, wait_http  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its descendants (all threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


async def fire(url: str, key: str, body: dict, rate: float, seconds: float,
               server_pid: int) -> tuple[list[float], int, float]:
    """Returns (latencies, errors, server CPU seconds spent during the timed requests)."""
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30) as client:
        for _ in range(10):  # warm connections and code paths
            await client.post("/v1/fine_tuning/jobs", json=body)

        async def one(at: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            start = time.perf_counter()
            try:
                ok = (await client.post("/v1/fine_tuning/jobs", json=body)).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

        t0 = time.perf_counter() + 0.2
        cpu0 = cpu_seconds(server_pid)
        await asyncio.gather(*(one(t0 + i / rate) for i in range(n)))
        cpu = cpu_seconds(server_pid) - cpu0
    return latencies, errors, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--broker-url", default=None, help="default: an empty database number of the local Redis")
    args = parser.parse_args()

    broker = args.broker_url or free_redis_url()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LORAMILL_DATA_DIR": f"{tmp}/data", "LORAMILL_BROKER_URL": broker, "LORAMILL_ADMIN_KEY": "bench"}
        if args.database_url:
            env["LORAMILL_DATABASE_URL"] = args.database_url
        run = lambda *a: subprocess.run([sys.executable, "-c", "from loramill.cli import main; main()", *a],  # noqa: E731
                                        env=env, check=True, capture_output=True, text=True).stdout.strip()
        key = run("tenant", "create", f"bench-{os.getpid()}")
        run("base", "create", f"{tmp}/base")
        model = f"bench-{os.getpid()}"  # a shared PostgreSQL may hold earlier runs' models
        run("model", "add", model, f"{tmp}/base")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port),
                                   "--log-level", "warning", "--no-access-log",
                                   "--workers", str(args.api_workers)], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/readyz", server)
            lines = "".join('{"prompt": "%d + 1 =", "completion": " %d"}\n' % (i, i + 1) for i in range(32))
            uploaded = httpx.post(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}, data={"purpose": "fine-tune"},
                                  files={"file": ("train.jsonl", lines.encode())}).json()
            body = {"model": model, "training_file": uploaded["id"], "hyperparameters": {"n_epochs": 1}}
            latencies, errors, cpu = asyncio.run(fire(url, key, body, args.rate, args.seconds, server.pid))
        finally:
            stop(server)
            if not args.broker_url:
                release_redis(broker)
    ms = sorted(x * 1000 for x in latencies)
    pct = lambda p: ms[min(len(ms) - 1, int(p / 100 * len(ms)))]  # noqa: E731
    db = "postgresql" if args.database_url and args.database_url.startswith("postgres") else "sqlite"
    print(f"job creation at {args.rate:.0f} req/s for {args.seconds:.0f}s ({len(ms)} requests, {errors} errors; "
          f"broker {broker.split('://')[0]}, database {db}, {args.api_workers} API process(es))")
    print(f"  p50 {pct(50):.1f} ms   p90 {pct(90):.1f} ms   p99 {pct(99):.1f} ms   max {ms[-1]:.1f} ms   mean {statistics.mean(ms):.1f} ms")
    print(f"  API process CPU {cpu / len(ms) * 1000:.2f} ms per request")
    print(f"  target p99 < 50 ms: {'met' if pct(99) < 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
