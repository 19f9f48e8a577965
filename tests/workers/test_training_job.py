"""The training task's life cycle, run in-process on a real job store with real training.

Jobs are created through the real API route; `run_training_job` is what the Celery task calls.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from service.tables import AdapterRow, CheckpointRow, JobEventRow, JobRow
from tests.service.conftest import chat_lines
from workers.context import context_for
from workers.model_cache import base_models
from workers.training import run_training_job


@pytest.fixture
def ctx(api):
    return context_for(api.settings)


def create_job(api, n_records=8, **hyperparameters):
    f = api.upload("alice", chat_lines(n_records)).json()
    hp = {"n_epochs": 1, "batch_size": 4, "max_seq_len": 64, **hyperparameters}
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                          json={"model": "tiny", "training_file": f["id"], "suffix": "t", "hyperparameters": hp,
                                "lora": {"rank": 4}})
    assert job.status_code == 200, job.text
    return job.json()["id"]


def job_row(ctx, job_id) -> JobRow:
    with ctx.db.sessions() as session:
        return session.scalar(select(JobRow).where(JobRow.id == job_id))


def events(ctx, job_id) -> list[JobEventRow]:
    with ctx.db.sessions() as session:
        return list(session.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.seq)))


def test_job_trains_records_progress_and_a_second_delivery_is_a_no_op(api, ctx):
    job_id = create_job(api, checkpoint_every=1)
    loads = base_models.loads
    assert run_training_job(ctx, job_id) == "succeeded"
    job = job_row(ctx, job_id)
    assert job.status == "succeeded" and job.fine_tuned_model == f"ft:tiny:alice:t:{job_id}"
    assert job.trained_tokens > 0 and job.finished_at and job.total_steps == 2 and len(job.result_files) == 1
    with ctx.db.sessions() as session:
        adapter = session.scalar(select(AdapterRow).where(AdapterRow.job_id == job_id))
        steps = sorted(c.step for c in session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id)))
    assert adapter.rank == 4 and adapter.fine_tuned_model == job.fine_tuned_model
    assert (ctx.artifacts.local_path(adapter.storage_key) / "adapter_model.safetensors").exists()
    assert steps == [1, 2]
    metrics = [e for e in events(ctx, job_id) if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [1, 2] and all(e.data["train_loss"] > 0 for e in metrics)
    n_events = len(events(ctx, job_id))
    assert run_training_job(ctx, job_id) == "succeeded"  # redelivered after success: nothing happens
    assert len(events(ctx, job_id)) == n_events
    # the base model stays loaded for the next job on the same base
    second = create_job(api)
    assert run_training_job(ctx, second) == "succeeded"
    assert base_models.loads - loads <= 1


def test_cancel_while_running_stops_within_seconds(api, ctx):
    job_id = create_job(api, n_records=16, n_epochs=50)  # 200 steps: far longer than the test

    def cancel_once_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(e.type == "metrics" for e in events(ctx, job_id)):
                cancelled_at.append(time.monotonic())
                api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.auth("alice"))
                return
            time.sleep(0.1)

    cancelled_at: list[float] = []
    thread = threading.Thread(target=cancel_once_running)
    thread.start()
    status = run_training_job(ctx, job_id)
    stopped_at = time.monotonic()
    thread.join()
    assert status == "cancelled" and job_row(ctx, job_id).status == "cancelled"
    assert cancelled_at and stopped_at - cancelled_at[0] < 5
    steps = [e.data["step"] for e in events(ctx, job_id) if e.type == "metrics"]
    assert max(steps) < 200
    with ctx.db.sessions() as session:
        assert session.scalar(select(AdapterRow).where(AdapterRow.job_id == job_id)) is None


def test_redelivered_running_job_resumes_from_its_last_checkpoint(api, ctx):
    job_id = create_job(api, n_records=16, n_epochs=1, checkpoint_every=2)  # 4 steps
    assert run_training_job(ctx, job_id) == "succeeded"
    # a worker that died after the step-2 checkpoint leaves the job running with that checkpoint recorded
    with ctx.db.sessions() as session:
        job = session.scalar(select(JobRow).where(JobRow.id == job_id))
        ckpt = session.scalar(select(CheckpointRow).where(CheckpointRow.job_id == job_id, CheckpointRow.step == 2))
        job.status, job.finished_at, job.fine_tuned_model, job.last_checkpoint = "running", None, None, ckpt.storage_key
        for row in session.scalars(select(AdapterRow).where(AdapterRow.job_id == job_id)):
            session.delete(row)
        session.commit()
    before = len(events(ctx, job_id))
    assert run_training_job(ctx, job_id) == "succeeded"
    new = events(ctx, job_id)[before:]
    assert new[0].message == "Resuming from step-000002 after a redelivery"
    assert [e.data["step"] for e in new if e.type == "metrics"] == [3, 4]


def test_job_cancelled_while_queued_never_trains(api, ctx):
    job_id = create_job(api)
    api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.auth("alice"))
    assert run_training_job(ctx, job_id) == "cancelled"
    assert not [e for e in events(ctx, job_id) if e.type == "metrics"]
