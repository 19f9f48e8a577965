"""What the benchmarks need to run a server process: a free port, readiness, stopping it, a Redis database.

The benchmarks expect the machine's services running (design.md, "Services on these machines");
they do not start them.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import time

import httpx

REDIS = ("127.0.0.1", 6379)
CLAIM_KEY = "loramill-test-claim"  # the key the test suite claims a database number with: the two never share one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 90) -> None:
    """Until `url` answers 200; fails early if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_redis_url() -> str:
    """A URL for an empty database number (1-15) of the local Redis, claimed with `CLAIM_KEY`."""
    import redis

    for db in secrets.SystemRandom().sample(range(1, 16), 15):
        client = redis.Redis(host=REDIS[0], port=REDIS[1], db=db)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, "1", nx=True, ex=3600):
            return f"redis://{REDIS[0]}:{REDIS[1]}/{db}"
    raise RuntimeError("no empty Redis database number left")


def release_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()
