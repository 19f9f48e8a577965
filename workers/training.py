"""Run one fine-tuning job: the body of the `loramill.train` task.

    queued ──▶ running ──▶ succeeded | failed | cancelled
                  ▲  └── a redelivered task finds `running` and resumes from `last_checkpoint`

Progress events are buffered and written with the job's ETA at most once a second, which is
also when the job row's `cancel_requested` is read; a checkpoint is recorded (row + the job's
`last_checkpoint`) as soon as the core reports it. The finished adapter is copied into the
artifact store as an adapter the tenant can list, download and merge.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select, update

from adapters.errors import InputError
from service.ids import new_id
from service.store import FINISHED, add_event, move, now
from service.tables import AdapterRow, BaseModelRow, CheckpointRow, FileRow, JobRow, Tenant
from workers.context import WorkerContext
from workers.model_cache import base_models

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def job_dir_key(job: JobRow) -> str:
    return f"jobs/{job.tenant_id}/{job.id}"


class ProgressRecorder:
    """The core's progress callback: persists events/checkpoints and answers True once cancellation is requested."""

    def __init__(self, ctx: WorkerContext, job_id: str, job_key: str, flush_every_s: float = 1.0):
        self.ctx, self.job_id, self.job_key, self.flush_every_s = ctx, job_id, job_key, flush_every_s
        self.pending: list = []
        self.last_flush = 0.0
        self.cancel = False

    def __call__(self, p) -> bool:
        metrics = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "train_loss": p.loss,
                   "learning_rate": p.lr, "tokens_seen": p.tokens_seen, "tokens_per_s": p.tokens_per_s}
        if p.val_loss is not None:
            metrics["valid_loss"] = p.val_loss
        text = f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}"
        self.pending.append((text + (f", validation loss={p.val_loss:.4f}" if p.val_loss is not None else ""), metrics))
        if p.checkpoint is not None or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush(p, checkpoint=p.checkpoint)
        return self.cancel

    def flush(self, p=None, checkpoint=None) -> None:
        with self.ctx.db.sessions() as session:
            for text, metrics in self.pending:
                add_event(session, self.job_id, text, type="metrics", data=metrics)
            self.pending.clear()
            values = {}
            if p is not None:
                values = {"total_steps": p.total_steps, "estimated_finish": now() + int(p.eta_s)}
            if checkpoint is not None:
                key = f"{self.job_key}/checkpoints/{checkpoint.name}"
                metrics = {"step": p.step, "train_loss": p.loss, "tokens_seen": p.tokens_seen}
                if p.val_loss is not None:
                    metrics["valid_loss"] = p.val_loss
                session.add(CheckpointRow(id=new_id("ftckpt"), job_id=self.job_id, step=p.step, metrics=metrics,
                                          storage_key=key, created_at=now()))
                values["last_checkpoint"] = key
                add_event(session, self.job_id, f"Checkpoint saved at step {p.step}")
            if values:
                session.execute(update(JobRow).where(JobRow.id == self.job_id).values(**values))
            self.cancel = bool(session.scalar(select(JobRow.cancel_requested).where(JobRow.id == self.job_id)))
            session.commit()
        self.last_flush = time.monotonic()


def run_training_job(ctx: WorkerContext, job_id: str) -> str:
    """Train job `job_id` to a terminal state (or leave it alone if it already has one); returns its status."""
    with ctx.db.sessions() as session:
        job = session.scalar(select(JobRow).where(JobRow.id == job_id))
        if job is None or job.status in FINISHED:
            return job.status if job else "missing"
        if job.cancel_requested:
            move(session, JobRow, job_id, ("validating_files", "queued", "running"), "cancelled")
            add_event(session, job_id, "Job cancelled before it started")
            session.commit()
            return "cancelled"
        redelivered = job.status == "running"
        if not move(session, JobRow, job_id, ("queued", "running"), "running", started_at=job.started_at or time.time()):
            return job.status
        resume_key = job.last_checkpoint if redelivered else None
        add_event(session, job_id, f"Resuming from {resume_key.rsplit('/', 1)[-1]} after a redelivery" if resume_key
                  else "Fine-tuning job started")
        session.commit()
        base = session.get(BaseModelRow, job.model)
        files = {f.id: f for f in session.scalars(select(FileRow).where(FileRow.id.in_(
            [job.training_file] + ([job.validation_file] if job.validation_file else []))))}
        tenant_name = session.get(Tenant, job.tenant_id).name

    try:
        if base is None or job.training_file not in files:
            raise InputError("the job's base model or training file was deleted before it ran", param="training_file")
        cfg = training_config(ctx, job, base.path, files, resume_key)
        recorder = ProgressRecorder(ctx, job_id, job_dir_key(job))
        from adapters.training import train

        result = train(cfg, progress=recorder, base_model=base_models.get(base.path))
        recorder.flush()
    except InputError as exc:
        return _fail(ctx, job_id, exc.code or "invalid_request", str(exc), exc.param)
    except Exception as exc:  # noqa: BLE001 — any crash fails the job with its message; redelivery would repeat it
        log.exception("training job %s crashed", job_id)
        return _fail(ctx, job_id, "internal_error", f"{type(exc).__name__}: {exc}", None)

    with ctx.db.sessions() as session:
        if result.stopped:
            move(session, JobRow, job_id, ("running",), "cancelled", trained_tokens=result.trained_tokens)
            add_event(session, job_id, f"Job cancelled at step {result.steps}")
            session.commit()
            return "cancelled"
        adapter_id = new_id("adapter")
        adapter_key = f"adapters/{job.tenant_id}/{adapter_id}"
        _store_adapter(ctx, result.adapter_dir, adapter_key)
        metrics_file = _store_metrics(ctx, session, job, result.metrics_path)
        name = f"ft:{job.model}:{tenant_name}:{job.suffix or ''}:{job.id}"
        config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        targets = config.get("target_modules")
        session.add(AdapterRow(id=adapter_id, tenant_id=job.tenant_id, name=name, base_model=job.model,
                               rank=int(config["r"]), target_modules=sorted(targets) if isinstance(targets, list) else [targets],
                               bytes=sum(f.stat().st_size for f in ctx.artifacts.local_path(adapter_key).iterdir()),
                               job_id=job.id, fine_tuned_model=name, storage_key=adapter_key, created_at=now()))
        if session.scalar(select(CheckpointRow.id).where(CheckpointRow.job_id == job_id, CheckpointRow.step == result.steps)) is None:
            session.add(CheckpointRow(id=new_id("ftckpt"), job_id=job_id, step=result.steps, storage_key=adapter_key,
                                      metrics={"step": result.steps, "train_loss": result.final_loss,
                                               **({"valid_loss": result.val_loss} if result.val_loss is not None else {})},
                                      created_at=now()))
        moved = move(session, JobRow, job_id, ("running",), "succeeded", fine_tuned_model=name, adapter_id=adapter_id,
                     trained_tokens=result.trained_tokens, result_files=[metrics_file], estimated_finish=None)
        if moved:
            add_event(session, job_id, f"New fine-tuned model created: {name}")
            add_event(session, job_id, "The job has successfully completed")
        session.commit()
        if not moved:  # cancelled or failed under us; the adapter row stays with its files
            return session.get(JobRow, job_id).status
    return "succeeded"


def training_config(ctx: WorkerContext, job: JobRow, base_path: str, files: dict, resume_key: str | None):
    from adapters.training import TrainingConfig

    hp, lora = job.hyperparameters, job.lora

    def path(file_id: str) -> str:
        return str(ctx.artifacts.local_path(files[file_id].storage_key))

    targets = lora["target_modules"]
    return TrainingConfig(
        base=base_path, data=path(job.training_file), out=str(ctx.artifacts.local_path(job_dir_key(job))),
        validation=path(job.validation_file) if job.validation_file else None,
        rank=lora["rank"], alpha=float(lora["alpha"]), dropout=float(lora["dropout"]),
        targets=targets if isinstance(targets, str) else tuple(targets), use_rslora=lora["use_rslora"],
        epochs=hp["n_epochs"], lr=hp["learning_rate"], batch_size=hp["batch_size"], grad_accum=hp["grad_accum"],
        max_seq_len=hp["max_seq_len"], packing=hp["packing"], seed=job.seed, save_every=hp["checkpoint_every"],
        max_rank=ctx.settings.max_rank,
        resume_from=str(ctx.artifacts.local_path(resume_key)) if resume_key else None,
        cache_dir=str(ctx.settings.data_dir.resolve() / "cache" / "datasets"),
    )


def _store_adapter(ctx: WorkerContext, adapter_dir, key: str) -> None:
    with tempfile.TemporaryDirectory(dir=ctx.settings.data_dir) as tmp:
        for name in ADAPTER_FILES:
            shutil.copy2(Path(adapter_dir) / name, Path(tmp) / name)
        ctx.artifacts.import_dir(key, Path(tmp))


def _store_metrics(ctx: WorkerContext, session, job: JobRow, metrics_path) -> str:
    file_id = new_id("file")
    key = f"files/{job.tenant_id}/{file_id}.jsonl"
    ctx.artifacts.import_file(key, metrics_path)
    session.add(FileRow(id=file_id, tenant_id=job.tenant_id, filename=f"{job.id}-metrics.jsonl",
                        purpose="fine-tune-results", bytes=metrics_path.stat().st_size, records=None, storage_key=key,
                        created_at=now()))
    return file_id


def _fail(ctx: WorkerContext, job_id: str, code: str, message: str, param: str | None) -> str:
    with ctx.db.sessions() as session:
        move(session, JobRow, job_id, ("queued", "running"), "failed", error={"code": code, "message": message, "param": param})
        add_event(session, job_id, f"Job failed: {message}", level="error")
        session.commit()
    return "failed"

