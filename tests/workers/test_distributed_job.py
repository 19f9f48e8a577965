"""A fine-tuning job on 2 devices (2 gloo processes here): refused where no worker offers them, and through
the task body (`run_training_job`) the same metrics, checkpoints, adapter and cancellation as on one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from jobs.tables import CheckpointRow, JobRow
from tests.workers.test_training_job import adapter_tensors, events, job_row, metrics_steps
from workers.context import context_for
from workers.training import run_training_job


def _post(api, **hyperparameters):
    from tests.service.conftest import chat_lines

    f = api.upload("alice", chat_lines(8)).json()
    return api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                           json={"model": "tiny", "training_file": f["id"], "lora": {"rank": 4},
                                 "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_seq_len": 64,
                                                     **hyperparameters}})


def _jobs(api) -> int:
    with api.app.state.services.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(JobRow))


def test_devices_out_of_range_or_above_the_workers_are_refused_and_nothing_is_stored(api):
    for devices, message in [(0, "must be an integer >= 1 and <= 64"), (65, "must be an integer >= 1 and <= 64"),
                             (2, "hyperparameters.devices 2 is more than the 1 device a training worker offers")]:
        r = _post(api, devices=devices)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error["message"] and error["param"].endswith("devices"), error
    assert _jobs(api) == 0


def test_a_sharding_that_is_unknown_or_given_for_one_device_is_refused_and_nothing_is_stored(api):
    for hyperparameters, message in [({"sharding": "zero3"}, "must be 'auto', 'ddp' or 'fsdp'"),
                                     ({"sharding": "fsdp"}, "'fsdp' needs hyperparameters.devices > 1"),
                                     ({"sharding": "ddp", "devices": 1}, "'ddp' needs hyperparameters.devices > 1")]:
        r = _post(api, **hyperparameters)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error["message"] and error["param"].endswith("sharding"), error
    assert _jobs(api) == 0


def test_a_worker_with_fewer_devices_fails_the_job_clearly(make_api):
    api = make_api(worker_devices=2)
    job_id = _post(api, devices=2).json()["id"]
    ctx = context_for(api.settings.model_copy(update={"worker_devices": 1}))
    assert run_training_job(ctx, job_id) == "failed"
    error = job_row(ctx, job_id).error
    assert error["code"] == "devices_unavailable" and "asks for 2 devices; this worker offers 1" in error["message"]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["auto", "fsdp"])
def test_a_two_device_job_matches_the_one_device_job_and_records_the_same(make_api, monkeypatch, sharding):
    import adapters.distributed

    launched = []
    launch = adapters.distributed.launch
    monkeypatch.setattr(adapters.distributed, "launch", lambda cfg, **kw: launched.append(cfg) or launch(cfg, **kw))
    api = make_api(worker_devices=2)
    ctx = context_for(api.settings)
    one = _post(api, checkpoint_every=1).json()["id"]
    posted = _post(api, checkpoint_every=1, devices=2, sharding=sharding).json()
    two = posted["id"]
    assert {k: posted["loramill_hyperparameters"][k] for k in ("devices", "sharding")} == {"devices": 2, "sharding": sharding}
    assert run_training_job(ctx, one) == "succeeded"
    assert run_training_job(ctx, two) == "succeeded"
    assert [cfg.sharding for cfg in launched] == [sharding]  # the job's choice reaches the ranks' launch
    job = job_row(ctx, two)
    assert job.hyperparameters["sharding"] == (sharding if sharding != "auto" else "ddp")  # "auto": DDP on the CPU
    chose = [e.message for e in events(ctx, two) if e.message.startswith("Sharding chosen")]
    assert chose == (["Sharding chosen for 2 devices from the base's size: ddp"] if sharding == "auto" else [])
    assert job.hyperparameters["devices"] == 2 and job.total_steps == 2 and job.trained_tokens == job_row(ctx, one).trained_tokens
    assert metrics_steps(ctx, two) == [1, 2]
    with ctx.db.sessions() as session:
        steps = sorted(c.step for c in session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == two)))
    assert steps == [1, 2]
    a, b = adapter_tensors(ctx, one), adapter_tensors(ctx, two)
    assert a.keys() == b.keys()
    for k in a:  # tolerance: tests/adapters/test_distributed.py
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _rank_pids() -> list[int]:
    """This process's children running `adapters.distributed` (the ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"adapters.distributed" in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                if f"PPid:\t{os.getpid()}\n" in status:
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_cancelling_a_two_device_job_stops_every_rank(make_api):
    api = make_api(worker_devices=2)
    ctx = context_for(api.settings)
    job_id = _post(api, devices=2, n_epochs=50).json()["id"]  # 100 steps: far longer than the test
    cancelled_at, ranks = [], []

    def cancel_once_running():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(e.type == "metrics" for e in events(ctx, job_id)):
                ranks.extend(_rank_pids())
                cancelled_at.append(time.monotonic())
                api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.auth("alice"))
                return
            time.sleep(0.1)

    thread = threading.Thread(target=cancel_once_running)
    thread.start()
    status = run_training_job(ctx, job_id)
    stopped_at = time.monotonic()
    thread.join()
    assert status == "cancelled" and job_row(ctx, job_id).status == "cancelled"
    assert len(ranks) == 2 and not _rank_pids()
    assert cancelled_at and stopped_at - cancelled_at[0] < 10
    assert max(metrics_steps(ctx, job_id)) < 100


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_killed_celery_worker_leaves_no_rank_and_the_job_resumes_on_another(tmp_path, llama_base):
    """Real processes: PostgreSQL, Redis, the API (with its reconciler) and a `celery worker` offering 2 devices.
    The worker is `kill -9`ed after the job's step-2 checkpoint: its ranks die with it; the lease lapses, the
    reconciler queues the job again, a second worker resumes it at the checkpoint and it succeeds, each step once."""
    import httpx

    from tests.service.conftest import chat_lines
    from tests.service.test_e2e import ADMIN, cli
    from tests.services import free_port, free_redis_url, postgres_database, release_redis, stop, wait_http

    with postgres_database() as db_url:
        broker = free_redis_url()
        env = {**os.environ, "LORAMILL_DATA_DIR": str(tmp_path / "data"), "LORAMILL_DATABASE_URL": db_url,
               "LORAMILL_BROKER_URL": broker, "LORAMILL_ADMIN_KEY": ADMIN, "LORAMILL_WORKER_DEVICES": "2",
               "LORAMILL_LEASE_TTL_S": "3", "LORAMILL_RECONCILE_INTERVAL_S": "1"}
        log = open(tmp_path / "processes.log", "w")

        def worker() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
                                     "train,merge", "-P", "prefork", "-c", "1", "-l", "INFO", "--without-gossip",
                                     "--without-mingle"], env=env, stdout=log, stderr=subprocess.STDOUT)

        port = free_port()
        first = worker()
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port",
                                str(port), "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
        second = None
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", api)
            key = cli(env, "tenant", "create", "acme")
            cli(env, "model", "add", "tiny", str(llama_base))
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                                timeout=60)
            f = http.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", chat_lines(16).encode())}).json()
            job = http.post("/v1/fine_tuning/jobs", json={
                "model": "tiny", "training_file": f["id"], "lora": {"rank": 4},
                "hyperparameters": {"n_epochs": 3, "batch_size": 4, "max_seq_len": 64, "checkpoint_every": 2,
                                    "devices": 2}}).json()  # 12 steps
            job_id = job["id"]

            def get():
                return http.get(f"/v1/fine_tuning/jobs/{job_id}").json()

            def checkpoints():
                return [c["step_number"] for c in http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]]

            deadline = time.monotonic() + 300
            while not checkpoints() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert checkpoints(), log.name
            pool = _children(first.pid)
            ranks = [r for p in pool for r in _children(p)]
            assert len(ranks) == 2 and get()["status"] == "running"
            for pid in [first.pid, *pool]:
                os.kill(pid, signal.SIGKILL)
            first.wait(30)
            deadline = time.monotonic() + 30
            while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [r for r in ranks if _alive(r)]  # no rank outlives its worker

            second = worker()
            deadline = time.monotonic() + 400
            while get()["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
                time.sleep(0.5)
            final = get()
            assert final["status"] == "succeeded", final["error"]
            events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
            assert any(e["message"].startswith("Resuming from step-") for e in events)
            steps = sorted(e["data"]["step"] for e in events if e["type"] == "metrics")
            assert steps == list(range(1, 13))  # the dead attempt's steps past its checkpoint were dropped and redone
        except BaseException:
            print((tmp_path / "processes.log").read_text()[-6000:])
            raise
        finally:
            stop(api)
            for proc in (first, second):
                if proc is not None:
                    stop(proc)
            release_redis(broker)
