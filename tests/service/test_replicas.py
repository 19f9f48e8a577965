"""API replicas on one store: `loramill serve --workers 2` (two processes on one port) and a second
`loramill serve` on another port, over one PostgreSQL and one Redis broker.

A tenant works through either; a key revoked with the CLI is refused by both within the tenant
cache's TTL; `/metrics` of the two-worker serve counts the requests both of its processes answered.
With no broker, a two-worker serve runs one embedded worker and one engine per base for both.
"""

from __future__ import annotations

import os
import time

import httpx
import psutil
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.service.test_e2e import cli
from tests.services import free_redis_url, postgres_database, release_redis, start_serve, stop

pytestmark = pytest.mark.slow
TTL_S = 2


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    with postgres_database() as db_url:
        broker = free_redis_url()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAMILL_", "PROMETHEUS_"))}
        env.update({"LORAMILL_DATA_DIR": str(tmp / "data"), "LORAMILL_DATABASE_URL": db_url,
                    "LORAMILL_BROKER_URL": broker, "LORAMILL_TENANT_CACHE_TTL_S": str(TTL_S),
                    "LORAMILL_RECONCILE_INTERVAL_S": "0"})
        processes = []
        try:
            processes.append(start_serve(env, tmp / "two.log", "--workers", "2"))
            processes.append(start_serve(env, tmp / "one.log"))
            yield {"env": env, "serves": processes, "data": tmp / "data"}
        finally:
            for process, _ in processes:
                stop(process)
            release_redis(broker)


def status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def test_a_tenant_works_through_either_and_a_revoked_key_stops_on_both_within_the_ttl(replicas):
    env = replicas["env"]
    key = cli(env, "tenant", "create", "carol")
    spare = cli(env, "tenant", "key", "create", "carol")
    urls = [url for _, url in replicas["serves"]]
    for url in urls:
        for _ in range(4):  # through both processes of the two-worker serve, most likely; each caches the key
            assert status(url, key) == 200
    first_id = cli(env, "tenant", "key", "list", "carol").splitlines()[0].split()[0]  # listed oldest first
    cli(env, "tenant", "key", "revoke", first_id)
    revoked_at = time.monotonic()
    refused = dict.fromkeys(urls, None)
    while any(when is None for when in refused.values()) and time.monotonic() - revoked_at < TTL_S + 10:
        for url in urls:
            if refused[url] is None and status(url, key) == 401:
                refused[url] = time.monotonic() - revoked_at
        time.sleep(0.1)
    assert all(when is not None and when <= TTL_S + 1 for when in refused.values()), refused  # TTL, plus the poll
    for url in urls:
        for _ in range(4):
            assert status(url, key) == 401  # on every process, for good
            assert status(url, spare) == 200


def test_metrics_of_a_two_worker_serve_count_both_processes(replicas):
    env = replicas["env"]
    key = cli(env, "tenant", "create", "dave")
    _, url = replicas["serves"][0]
    metrics_dirs = list((replicas["data"] / "prometheus").glob("serve-*"))
    assert len(metrics_dirs) == 1  # the two-worker serve's; the one-process serve keeps its metrics in memory

    def counted() -> float:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("loramill_http_request_duration_seconds_count") and 'route="/v1/models"' in line)

    def processes_that_answered() -> int:
        """The serve's processes whose own metrics file holds a /v1/models observation."""
        files = metrics_dirs[0].glob("histogram_*.db")
        return sum(any('"/v1/models"' in key for key, *_ in MmapedDict.read_all_values_from_file(str(f)))
                   for f in files)

    before, sent = counted(), 0
    with httpx.Client(headers={"Authorization": f"Bearer {key}", "Connection": "close"}, timeout=30) as client:
        while processes_that_answered() < 2 and sent < 400:  # a new connection each time: either process takes it
            assert client.get(f"{url}/v1/models").status_code == 200
            sent += 1
    assert processes_that_answered() == 2, "one process answered every request"
    assert counted() - before == sent  # whichever process answers /metrics sums both


def test_an_embedded_serve_with_two_workers_starts_one_worker_and_one_engine_per_base(tmp_path, llama_base):
    """No broker: the supervising serve runs the embedded worker once; both API processes use one engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAMILL_", "PROMETHEUS_"))}
    env.update({"LORAMILL_DATA_DIR": str(tmp_path / "data"), "LORAMILL_ENGINE_MAX_MODEL_LEN": "128",
                "LORAMILL_ENGINE_DEVICE": "cpu", "LORAMILL_ENGINE_THREADS": "1"})
    key = cli(env, "tenant", "create", "erin")
    cli(env, "model", "add", "tiny", str(llama_base))
    process, url = start_serve(env, tmp_path / "serve.log", "--workers", "2")
    try:
        metrics_dir = next((tmp_path / "data" / "prometheus").glob("serve-*"))
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "ignore_eos": True}  # sampled: EOS may come first
        with httpx.Client(headers={"Authorization": f"Bearer {key}", "Connection": "close"}, timeout=300) as client:
            for _ in range(40):  # a new connection each time, until both processes have answered one
                assert client.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"] == 2
                answered = [f for f in metrics_dir.glob("histogram_*.db")
                            if any('"/v1/completions"' in k for k, *_ in MmapedDict.read_all_values_from_file(str(f)))]
                if len(answered) == 2:
                    break
        assert len(answered) == 2
        children = [" ".join(p.cmdline()) for p in psutil.Process(process.pid).children(recursive=True)]
        assert sum(" engine " in c for c in children) == 1, children
        assert sum(" worker " in c for c in children) == 1, children
    finally:
        stop(process)
