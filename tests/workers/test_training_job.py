"""The training task's life cycle, run in-process on a real job store with real training.

Jobs are created through the real API route; `run_training_job` is what the Celery task calls.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from sqlalchemy import select, update

from jobs.reconciler import Reconciler
from jobs.tables import AdapterRow, CheckpointRow, JobEventRow, JobRow
from tests.service.conftest import chat_lines
from workers import training
from workers.context import context_for
from workers.model_cache import BaseModelCache, base_models
from workers.training import ProgressRecorder, run_training_job


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


def test_checkpoints_are_pruned_to_the_newest_k_with_the_adapter_as_the_last(make_api):
    """LORAMILL_KEEP_CHECKPOINTS=2: while training, the newest 2 checkpoints stay; once the job succeeds, its
    checkpoint list is the newest 2 counting the final adapter, and no pruned checkpoint's files remain."""
    api = make_api(keep_checkpoints=2)
    ctx = context_for(api.settings)
    job_id = create_job(api, n_records=20, checkpoint_every=1)  # 5 steps: checkpoints at 1..4, the adapter at 5
    kept_while_training = []
    record = ProgressRecorder.__call__

    def watch(self, p):
        done = record(self, p)  # writes the step's checkpoint row, when it has one, before it returns
        with ctx.db.sessions() as session:
            kept_while_training.append(sorted(session.scalars(select(CheckpointRow.step).where(
                CheckpointRow.job_id == job_id))))
        return done

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProgressRecorder, "__call__", watch)
        assert run_training_job(ctx, job_id) == "succeeded"
    assert kept_while_training == [[1], [1, 2], [2, 3], [3, 4], [3, 4]]
    listed = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=api.auth("alice")).json()["data"]
    assert sorted(c["step_number"] for c in listed) == [4, 5]
    job = job_row(ctx, job_id)
    on_disk = ctx.artifacts.local_path(f"jobs/{job.tenant_id}/{job_id}/attempt-1/checkpoints")
    assert sorted(p.name for p in on_disk.iterdir()) == ["step-000004"]


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


class WorkerDied(BaseException):
    """Stands for a `kill -9`: not an `Exception`, so the life cycle records nothing as the worker 'dies'."""


def adapter_tensors(ctx, job_id) -> dict:
    from safetensors.torch import load_file

    with ctx.db.sessions() as session:
        rows = list(session.scalars(select(AdapterRow).where(AdapterRow.job_id == job_id)))
    assert len(rows) == 1
    return load_file(str(ctx.artifacts.local_path(rows[0].storage_key) / "adapter_model.safetensors"))


def metrics_steps(ctx, job_id) -> list[int]:
    return [e.step for e in events(ctx, job_id) if e.type == "metrics"]


def test_an_attempt_after_a_dead_worker_resumes_at_its_checkpoint_with_nothing_doubled(api, ctx, monkeypatch):
    uninterrupted = create_job(api, n_records=16, n_epochs=2, checkpoint_every=3)  # 8 steps
    assert run_training_job(ctx, uninterrupted) == "succeeded"
    job_id = create_job(api, n_records=16, n_epochs=2, checkpoint_every=3)
    record = ProgressRecorder.__call__

    def die_after_step_4(self, p):  # the step-3 checkpoint and step 4's metrics are written, then the process dies
        done = record(self, p)
        if p.step == 4:
            self.flush(p)
            raise WorkerDied
        return done

    monkeypatch.setattr(ProgressRecorder, "__call__", die_after_step_4)
    with pytest.raises(WorkerDied):
        run_training_job(ctx, job_id)
    monkeypatch.undo()
    assert metrics_steps(ctx, job_id) == [1, 2, 3, 4] and job_row(ctx, job_id).status == "running"
    assert run_training_job(ctx, job_id) == "running"  # its lease has not expired: nobody may take the job
    with ctx.db.sessions() as session:  # time passes: the dead worker's lease expires
        session.execute(update(JobRow).where(JobRow.id == job_id).values(lease_expires_at=0))
        session.commit()

    assert run_training_job(ctx, job_id) == "succeeded"
    job = job_row(ctx, job_id)
    assert job.attempts == 2 and job.status == "succeeded" and len(job.result_files) == 1
    messages = [e.message for e in events(ctx, job_id) if e.type == "message"]
    assert "Resuming from step-000003 (attempt 2)" in messages
    assert metrics_steps(ctx, job_id) == list(range(1, 9))  # step 4 of the dead attempt was dropped and redone
    with ctx.db.sessions() as session:
        steps = sorted(c.step for c in session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id)))
    assert steps == [3, 6, 8]
    a, b = adapter_tensors(ctx, uninterrupted), adapter_tensors(ctx, job_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    attempts = sorted(p.name for p in ctx.artifacts.local_path(f"jobs/{job.tenant_id}/{job_id}").iterdir())
    assert attempts == ["attempt-1", "attempt-2"]  # attempt 1 keeps only its step-3 checkpoint
    assert [p.name for p in ctx.artifacts.local_path(f"jobs/{job.tenant_id}/{job_id}/attempt-1").rglob("*")
            if p.parent.name == "checkpoints"] == ["step-000003"]


def test_a_stale_worker_writes_nothing_once_another_holds_the_job(api, ctx, monkeypatch):
    """Two workers hold one job: A (whose lease expired while it was stalled) and B, which took it over."""
    job_id = create_job(api, n_records=16, n_epochs=2)  # 8 steps
    stalled, resume_a = threading.Event(), threading.Event()
    record = ProgressRecorder.__call__

    def stall_at_step_2(self, p):
        if p.step == 2 and not stalled.is_set():
            stalled.set()
            resume_a.wait(120)
        return record(self, p)

    monkeypatch.setattr(ProgressRecorder, "__call__", stall_at_step_2)
    outcome_a = []
    worker_a = threading.Thread(target=lambda: outcome_a.append(run_training_job(ctx, job_id)))
    worker_a.start()
    assert stalled.wait(120)
    with ctx.db.sessions() as session:  # A stalls past its lease (a long GC pause, a frozen VM, a partition)
        session.execute(update(JobRow).where(JobRow.id == job_id).values(lease_expires_at=0))
        session.commit()
    reconciler = Reconciler(ctx.db, api.app.state.services.queue, interval_s=1, resend_after_s=60)
    assert job_id in reconciler.run_once()
    monkeypatch.setattr(training, "base_models", BaseModelCache())  # B is another process: its own model
    assert run_training_job(ctx, job_id) == "succeeded"  # worker B
    resume_a.set()
    worker_a.join(120)
    assert outcome_a == ["lease_lost"]
    job = job_row(ctx, job_id)
    assert job.status == "succeeded" and job.attempts == 2 and job.error is None
    assert metrics_steps(ctx, job_id) == list(range(1, 9))  # A's step 2 never landed, nor anything after it
    adapter_tensors(ctx, job_id)  # exactly one adapter row


def test_job_cancelled_while_queued_never_trains(api, ctx):
    job_id = create_job(api)
    api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.auth("alice"))
    assert run_training_job(ctx, job_id) == "cancelled"
    assert not [e for e in events(ctx, job_id) if e.type == "metrics"]


def test_a_default_job_learns_the_sample_dataset_and_reports_what_auto_chose(api, ctx):
    """No hyperparameters given: "auto" chooses from the dataset; the loss ends below 1.0 and the model answers."""
    from importlib import resources

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sample = (resources.files("loramill") / "data" / "capitals.jsonl").read_bytes()
    f = api.client.post("/v1/files", headers=api.auth("alice"), data={"purpose": "fine-tune"},
                        files={"file": ("capitals.jsonl", sample)})
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                          json={"model": "tiny", "training_file": f.json()["id"]}).json()
    assert job["hyperparameters"] == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert run_training_job(ctx, job["id"]) == "succeeded"
    done = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=api.auth("alice")).json()
    assert done["hyperparameters"] == {"n_epochs": 25, "batch_size": 8, "learning_rate_multiplier": 16.0}
    losses = [e.data["train_loss"] for e in events(ctx, job["id"]) if e.type == "metrics"]
    assert len(losses) == 25 * 12 and losses[-1] < 1.0
    assert any(e.message.startswith("Hyperparameters chosen from the dataset: n_epochs=25") for e in events(ctx, job["id"]))

    with ctx.db.sessions() as session:
        from jobs.tables import BaseModelRow

        base_path = session.get(BaseModelRow, "tiny").path
        adapter_key = session.scalar(select(AdapterRow.storage_key).where(AdapterRow.job_id == job["id"]))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(ctx.artifacts.local_path(adapter_key)))
    for country, capital in (("Italy", "Rome"), ("France", "Paris")):  # France: the demo's question
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"What is the capital of {country}?"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)  # bytes: "…Paris." is 31
        assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == \
            f"The capital of {country} is {capital}."
