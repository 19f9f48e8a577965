"""Celery tasks: each takes a job id and hands it to the function that runs that kind of job."""

from __future__ import annotations

from jobs.queue import MERGE_TASK, TRAIN_TASK
from workers.celery_app import app
from workers.context import worker_context


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> str:
    from workers.training import run_training_job

    return run_training_job(worker_context(), job_id)


@app.task(name=MERGE_TASK)
def merge_job(merge_id: str) -> str:
    from workers.merging import run_merge_job

    return run_merge_job(worker_context(), merge_id)
