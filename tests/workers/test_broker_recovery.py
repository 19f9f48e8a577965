"""With a real broker and real worker processes: what the message cannot promise, leases make good.

- A worker killed mid-job, on Redis and on RabbitMQ. Redis leaves its message unacknowledged for
  the whole visibility timeout (48 h by default); RabbitMQ requeues it at once, and the other
  worker, finding the job under the dead worker's live lease, acknowledges it and does nothing.
  Either way the job's lease expires, the API's reconciler queues it again, and the other worker
  runs it within a lease's lifetime, each step once, leaving no message behind.
- A Redis restarted without persistence forgets a queued merge's message; the reconciler sends
  it again and the merge completes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.service.conftest import chat_lines
from tests.service.test_e2e import cli
from jobs.queue import QUEUES, JobQueue
from loramill.settings import Settings
from tests.services import free_port, postgres_database, stop, wait_http

pytestmark = pytest.mark.slow


def start_worker(env, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from loramill.cli import main; main()", "worker", "--pool", "solo",
                             "--queues", "train,merge"], env=env, stdout=log, stderr=subprocess.STDOUT)


def start_api(env, log, port: int) -> subprocess.Popen:
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port),
                            "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/healthz", api)
    return api


@contextlib.contextmanager
def stack(tmp_path, broker: str, **settings: str):
    with postgres_database() as db_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
        env.update({"LORAMILL_DATA_DIR": str(tmp_path / "data"), "LORAMILL_DATABASE_URL": db_url,
                    "LORAMILL_BROKER_URL": broker, **{f"LORAMILL_{k.upper()}": v for k, v in settings.items()}})
        log = open(tmp_path / "processes.log", "ab")  # noqa: SIM115
        processes: list[subprocess.Popen] = []
        try:
            yield env, log, processes
        except BaseException:
            log.flush()
            print((tmp_path / "processes.log").read_bytes()[-8000:].decode(errors="replace"))
            raise
        finally:
            for process in processes:
                stop(process)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def test_a_worker_killed_mid_job_is_replaced_within_two_minutes(tmp_path, llama_base, broker_url):
    # the default visibility timeout (48 h): only the lease can bring the job back in time on Redis
    with stack(tmp_path, broker_url, lease_ttl_s="15", reconcile_interval_s="2") as (env, log, processes):
        key = cli(env, "tenant", "create", "acme")
        cli(env, "model", "add", "tiny", str(llama_base))
        port = free_port()
        processes.append(start_api(env, log, port))
        workers = {name: start_worker(env, log) for name in ("a", "b")}
        processes.extend(workers.values())
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)
        file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("t.jsonl", chat_lines(32).encode())}).json()["id"]
        job_id = http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, "hyperparameters": {
            "n_epochs": 6, "batch_size": 4, "max_seq_len": 64, "checkpoint_every": 4}}).json()["id"]

        def job():
            return http.get(f"/v1/fine_tuning/jobs/{job_id}").json()

        def events():
            return http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]

        def steps():
            return [e["data"]["step"] for e in events() if e["type"] == "metrics"]

        wait_for(lambda: len(steps()) >= 5, 180, "training started")
        holder = next(name for name, p in workers.items() if holds_lease(p.pid, job_id, env))
        killed_at = time.monotonic()
        os.kill(workers[holder].pid, signal.SIGKILL)
        survivor = workers["b" if holder == "a" else "a"]
        wait_for(lambda: job()["status"] == "running" and holds_lease(survivor.pid, job_id, env), 120,
                 "the job running again on the other worker")
        back_after_s = time.monotonic() - killed_at
        print(f"running again on the other worker {back_after_s:.0f} s after the kill")
        assert back_after_s < 120
        done = wait_for(lambda: (j := job())["status"] in ("succeeded", "failed") and j, 300, "the job finishing")
        assert done["status"] == "succeeded", done["error"]
        assert sorted(steps()) == list(range(1, 49))  # 8 steps a epoch, 6 epochs, none twice
        assert [e["message"] for e in events()].count("Its worker stopped responding; the job is queued again") == 1
        assert job_row(job_id, env).attempts == 2  # on RabbitMQ, the message redelivered at the kill claimed nothing
        queue = JobQueue(Settings(data_dir=tmp_path / "data", broker_url=broker_url))
        assert queue.depths() == dict.fromkeys(QUEUES, 0)  # no message left waiting: the job was resent once


def holds_lease(pid: int, job_id: str, env) -> bool:
    """Whether worker process `pid` holds the job's lease (the job row names its holder `host:pid`)."""
    row = job_row(job_id, env)
    return row.status == "running" and row.worker is not None and row.worker.endswith(f":{pid}")


def job_row(job_id: str, env):
    from sqlalchemy import create_engine, select

    from jobs.tables import JobRow

    engine = create_engine(env["LORAMILL_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return conn.execute(select(JobRow.worker, JobRow.status, JobRow.attempts).where(JobRow.id == job_id)).one()
    finally:
        engine.dispose()


@contextlib.contextmanager
def private_redis(tmp_path):
    """A redis-server of this test's own, with no persistence, that the test may restart."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp_path)]
    server = {"process": subprocess.Popen(command, stdout=subprocess.DEVNULL)}

    def restart() -> None:
        stop(server["process"])
        server["process"] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(lambda: _redis_answers(port), 30, "redis back")

    wait_for(lambda: _redis_answers(port), 30, "redis up")
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        stop(server["process"])


def _redis_answers(port: int) -> bool:
    import redis

    with contextlib.suppress(redis.ConnectionError):
        return bool(redis.Redis(port=port).ping())
    return False


def test_a_merge_queued_before_a_redis_restart_completes_after_it(tmp_path, llama_base, peft_adapter):
    import redis

    with private_redis(tmp_path) as (broker, restart_redis), \
            stack(tmp_path, broker, reconcile_interval_s="1", resend_after_s="3") as (env, log, processes):
        key = cli(env, "tenant", "create", "acme")
        cli(env, "model", "add", "tiny", str(llama_base))
        port = free_port()
        processes.append(start_api(env, log, port))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)
        files = [("file", (name, (peft_adapter / name).read_bytes())) for name in
                 ("adapter_config.json", "adapter_model.safetensors")]
        adapter = http.post("/v1/adapters", data={"base_model": "tiny"}, files=files).json()
        merge_id = http.post("/v1/merges", json={"base_model": "tiny", "adapters": [{"adapter": adapter["id"]}]}).json()["id"]
        assert redis.Redis.from_url(broker).llen("merge") == 1  # queued, with no worker yet
        restart_redis()  # without persistence: the message is gone
        assert redis.Redis.from_url(broker).llen("merge") == 0
        processes.append(start_worker(env, log))

        def merge():
            return http.get(f"/v1/merges/{merge_id}").json()

        done = wait_for(lambda: (m := merge())["status"] in ("succeeded", "failed") and m, 120, "the merge finishing")
        assert done["status"] == "succeeded", done["error"]
        assert {"config.json", "loramill-manifest.json"} <= {f["name"] for f in done["files"]}
