"""The embedded default under `kill -9`: `loramill serve` with its own worker, as real processes.

- `serve` killed mid-job: its worker dies with it, the next `serve` resumes the job from its
  last checkpoint, and the job ends with exactly one adapter, one result file and no doubled
  metrics or checkpoints — and the same adapter as an uninterrupted run.
- the worker killed alone: `/readyz` says so, `serve` brings a worker back, the job finishes.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load

from adapters.errors import InputError
from service.embedded import READY_FILE, hold_embedded_lock
from tests.service.conftest import chat_lines
from tests.service.test_e2e import cli
from tests.services import free_port, stop, wait_http

pytestmark = pytest.mark.slow
HYPERPARAMETERS = {"n_epochs": 4, "batch_size": 4, "max_seq_len": 64, "checkpoint_every": 4}  # 32 steps


def test_a_second_embedded_serve_on_the_same_data_dir_is_refused(tmp_path):
    held = hold_embedded_lock(tmp_path / "data")
    with pytest.raises(InputError, match="another `loramill serve`"):
        hold_embedded_lock(tmp_path / "data")
    held.close()
    hold_embedded_lock(tmp_path / "data").close()  # free again once the first one is gone


class Serve:
    """`loramill serve` on a data dir, restartable; its log is kept for failures."""

    def __init__(self, tmp_path, llama_base):
        self.data = tmp_path / "data"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
        self.env.update({"LORAMILL_DATA_DIR": str(self.data), "LORAMILL_RECONCILE_INTERVAL_S": "1"})
        self.key = cli(self.env, "tenant", "create", "acme")
        cli(self.env, "model", "add", "tiny", str(llama_base))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115 — closed with the test's tmp dir
        self.process: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "from loramill.cli import main; main()", "serve",
                                         "--port", str(self.port)], env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/readyz", self.process, timeout_s=120)

    def worker_pid(self) -> int:
        return int((self.data / READY_FILE).read_text())

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/fine_tuning/jobs/{job_id}").json()

    def create_job(self, file_id: str) -> str:
        response = self.http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, "seed": 3,
                                                                "hyperparameters": HYPERPARAMETERS})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def wait(self, job_id: str, done, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if done(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: {job['status']} after {timeout_s}s\n{self.tail()}")

    def metrics_steps(self, job_id: str) -> list[int]:
        events = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return sorted(e["data"]["step"] for e in events if e["type"] == "metrics")

    def adapter(self, job: dict) -> dict[str, torch.Tensor]:
        archive = self.http.get(f"/v1/adapters/{job['adapter_id']}/archive").content
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("adapter_model.safetensors"))
            return load(tar.extractfile(member).read())

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()[-6000:].decode(errors="replace")

    def close(self) -> None:
        if self.process is not None:
            stop(self.process)
        self.http.close()


@pytest.fixture
def serve(tmp_path, llama_base):
    server = Serve(tmp_path, llama_base)
    server.start()
    yield server
    server.close()


def test_serve_killed_mid_job_then_restarted_finishes_it_once(serve):
    file_id = serve.http.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", chat_lines(32).encode())}).json()["id"]
    job_id = serve.create_job(file_id)
    serve.wait(job_id, lambda j: max(serve.metrics_steps(j["id"]) or [0]) >= 6)  # past its step-4 checkpoint
    worker = psutil.Process(serve.worker_pid())
    os.kill(serve.process.pid, signal.SIGKILL)
    serve.process.wait()
    worker.wait(timeout=10)  # the worker died with its serve: nothing trains on as an orphan

    serve.start()
    job = serve.wait(job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result_files"]) == 1
    adapters = serve.http.get("/v1/adapters").json()["data"]
    assert [a["fine_tuning_job_id"] for a in adapters] == [job_id]
    results = [f for f in serve.http.get("/v1/files").json()["data"] if f["purpose"] == "fine-tune-results"]
    assert [f["id"] for f in results] == job["result_files"]
    assert serve.metrics_steps(job_id) == list(range(1, 33))
    checkpoints = serve.http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]
    assert sorted(c["step_number"] for c in checkpoints) == [24, 28, 32]  # LORAMILL_KEEP_CHECKPOINTS: the newest 3
    messages = [e["message"] for e in serve.http.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                                     params={"limit": 1000}).json()["data"]]
    assert any(m.startswith("Resuming from step-") and m.endswith("(attempt 2)") for m in messages)

    again = serve.wait(serve.create_job(file_id), lambda j: j["status"] == "succeeded")  # the same job, uninterrupted
    interrupted, uninterrupted = serve.adapter(job), serve.adapter(again)
    assert interrupted.keys() == uninterrupted.keys()
    assert all(torch.equal(interrupted[k], uninterrupted[k]) for k in interrupted)


def test_a_dead_worker_is_reported_and_replaced_and_its_job_finishes(serve):
    file_id = serve.http.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", chat_lines(32).encode())}).json()["id"]
    job_id = serve.create_job(file_id)
    serve.wait(job_id, lambda j: max(serve.metrics_steps(j["id"]) or [0]) >= 2)
    first = serve.worker_pid()
    os.kill(first, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while (ready := httpx.get(f"{serve.url}/readyz")).status_code == 200:
        assert time.monotonic() < deadline, "/readyz never noticed the dead worker"
        time.sleep(0.05)
    assert ready.status_code == 503 and ready.json()["checks"]["worker"] != "ok"
    assert ready.json()["checks"]["database"] == "ok"
    wait_http(f"{serve.url}/readyz", serve.process, timeout_s=120)  # a new worker, with no restart by hand
    assert serve.worker_pid() != first and serve.process.poll() is None

    job = serve.wait(job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    assert serve.metrics_steps(job_id) == list(range(1, 33))
