"""End to end through the official `openai` SDK against real processes.

- `redis`, `rabbitmq`: PostgreSQL (a fresh database), the broker (an empty Redis db number, or a
  RabbitMQ virtual host of the test's own, with quorum queues), a real `celery worker` subprocess
  and the API under uvicorn in a subprocess.
- `embedded`: `loramill serve` alone: SQLite, the filesystem broker and its own worker; no Redis.

Each: upload a file, create a job, see it succeed, page its events, list its checkpoints; merge
its adapter, download every file (one resumed with `Range`) checking sha256, load the result with
transformers; cancel a running job and see `cancelled` within seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.service.conftest import chat_lines
from tests.services import fresh_broker, free_port, postgres_database, stop, wait_http

pytestmark = pytest.mark.slow
ADMIN = "e2e-admin-key"
LOG = None


def cli(env, *args) -> str:
    out = subprocess.run([sys.executable, "-c", "from loramill.cli import main; main()", *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@contextlib.contextmanager
def broker_stack(tmp_path, kind: str):
    with postgres_database() as db_url, fresh_broker(kind) as broker:
        env = {**os.environ, "LORAMILL_DATA_DIR": str(tmp_path / "data"), "LORAMILL_DATABASE_URL": db_url,
               "LORAMILL_BROKER_URL": broker, "LORAMILL_ADMIN_KEY": ADMIN}
        port = free_port()
        log = open(tmp_path / "processes.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "train,merge",
                                   "-P", "prefork", "-c", "1", "-l", "INFO", "--without-gossip", "--without-mingle"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port),
                                "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", api)
            yield env, f"http://127.0.0.1:{port}"
        finally:
            stop(api)
            stop(worker)


@contextlib.contextmanager
def embedded_stack(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env.update({"LORAMILL_DATA_DIR": str(tmp_path / "data"), "LORAMILL_ADMIN_KEY": ADMIN})
    port = free_port()
    log = open(tmp_path / "processes.log", "w")
    server = subprocess.Popen([sys.executable, "-c", "from loramill.cli import main; main()", "serve", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", server)
        yield env, f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def wait_status(get, want: tuple[str, ...], timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        obj = get()
        if obj.status in want:
            return obj
        time.sleep(0.3)
    raise AssertionError(f"still {obj.status} after {timeout_s}s")


@pytest.mark.parametrize("mode", ["redis", "rabbitmq", "embedded"])
def test_fine_tune_merge_download_cancel(mode, tmp_path, llama_base):
    from openai import OpenAI

    stack = embedded_stack(tmp_path) if mode == "embedded" else broker_stack(tmp_path, mode)
    with stack as (env, url):
        key = cli(env, "tenant", "create", "acme")
        cli(env, "model", "add", "tiny", str(llama_base))
        client = OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
        try:
            _flow(client, url, key, tmp_path)
        except BaseException:
            print((tmp_path / "processes.log").read_text()[-6000:])
            raise


def _flow(client, url: str, key: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    uploaded = client.files.create(file=("train.jsonl", chat_lines(8).encode()), purpose="fine-tune")
    assert uploaded.purpose == "fine-tune" and uploaded.bytes > 0
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.content(uploaded.id).read() == chat_lines(8).encode()

    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, suffix="e2e", seed=1,
                                         hyperparameters={"n_epochs": 2, "batch_size": 4, "max_seq_len": 64,
                                                          "checkpoint_every": 2})
    assert job.status in ("validating_files", "queued", "running")
    job = wait_status(lambda: client.fine_tuning.jobs.retrieve(job.id), ("succeeded", "failed", "cancelled"), 240)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:acme:e2e:{job.id}" and job.trained_tokens > 0

    all_events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # auto-paginates with `after`
    messages = [e.message for e in all_events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Validating training file")
    assert len({e.id for e in all_events}) == len(all_events) > 6
    assert [e.data["step"] for e in all_events if e.type == "metrics"] == [4, 3, 2, 1]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in checkpoints) == [2, 4] and all(c.metrics.train_loss > 0 for c in checkpoints)
    assert job.fine_tuned_model in [m.id for m in client.models.list()]

    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    merge = http.post("/v1/merges", json={"base_model": "tiny", "adapters": [{"adapter": job.fine_tuned_model, "weight": 1.0}]})
    assert merge.status_code == 200, merge.text
    merge_id = merge.json()["id"]
    deadline = time.monotonic() + 180
    while (merge := http.get(f"/v1/merges/{merge_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert merge["status"] == "succeeded", merge["error"]
    files = http.get(f"/v1/merges/{merge_id}/files").json()["data"]
    assert {"config.json", "loramill-manifest.json"} <= {f["name"] for f in files}
    out = tmp_path / "downloaded"
    out.mkdir()
    for entry in files:
        path = f"/v1/merges/{merge_id}/files/{entry['name']}"
        if entry["bytes"] > 1000:  # resume: first half, then the rest with Range
            half = entry["bytes"] // 2
            first = http.get(path, headers={"Range": f"bytes=0-{half - 1}"})
            rest = http.get(path, headers={"Range": f"bytes={half}-"})
            assert first.status_code == rest.status_code == 206
            assert rest.headers["content-range"] == f"bytes {half}-{entry['bytes'] - 1}/{entry['bytes']}"
            data = first.content + rest.content
        else:
            response = http.get(path)
            assert response.headers["x-content-sha256"] == entry["sha256"]
            data = response.content
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        (out / entry["name"]).write_bytes(data)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2

    long_job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 4, "max_seq_len": 64})
    wait_status(lambda: client.fine_tuning.jobs.retrieve(long_job.id), ("running",), 120)
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long_job.id, limit=5).data):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    asked = time.monotonic()
    client.fine_tuning.jobs.cancel(long_job.id)
    cancelled = wait_status(lambda: client.fine_tuning.jobs.retrieve(long_job.id), ("cancelled",), 10)
    assert time.monotonic() - asked < 10 and cancelled.finished_at is not None
