"""Run one fine-tuning job: the body of the `loramill.train` task, on the shared life cycle (`jobs.lifecycle`).

Each attempt (claim) of a job trains into a directory of its own, `jobs/<tenant>/<job>/attempt-<n>/`,
so two attempts never write the same file. An attempt after the first resumes from the job's
last checkpoint, which may live in an earlier attempt's directory: before training it drops the
metrics events that a dead attempt logged past that checkpoint and removes whatever dead
attempts left that no checkpoint row refers to. Progress (metrics events, checkpoints, the ETA)
is written through the lease at most once a second and at each checkpoint, which is also when
a cancellation request is noticed. The finished adapter is copied to `<attempt>/adapter/`, and
the adapter row, the metrics file row and the job's success are written in one fenced commit.

A job with `hyperparameters.devices = N > 1` trains on N processes (`adapters.distributed`): this
process keeps the lease and writes to the store exactly as for one process (the same progress
recorder and stop check, fed by rank 0's reports), so resume, cancellation, lease loss and
metrics are the same; a worker whose `worker_devices` is below N fails the job with a clear error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import delete, select

from adapters.auto_hyperparameters import BASE_LEARNING_RATE
from adapters.errors import InputError
from adapters.peft_format import ADAPTER_FILES, CONFIG_NAME
from adapters.training import METRICS_NAME
from jobs import lifecycle
from jobs.artifacts import attempt_key, file_digest, job_key
from jobs.ids import new_id
from jobs.lifecycle import FINE_TUNING, Cancelled, Lease, LeaseLost
from jobs.store import now
from jobs.tables import AdapterRow, BaseModelRow, CheckpointRow, FileRow, JobEventRow, JobRow, Tenant
from workers.context import WorkerContext
from workers.model_cache import base_models


def run_training_job(ctx: WorkerContext, job_id: str) -> str:
    """Train job `job_id` to an end (or leave it to the worker that holds it); returns its status."""
    return lifecycle.run(ctx.db, FINE_TUNING, job_id, lambda lease: _train(ctx, lease),
                         ttl_s=ctx.settings.lease_ttl_s, worker=ctx.name)


@dataclass(frozen=True)
class _Inputs:
    job: JobRow
    base_path: str
    files: dict[str, FileRow]
    tenant_name: str
    resume: CheckpointRow | None  # the checkpoint this attempt continues from


def _load(ctx: WorkerContext, lease: Lease) -> _Inputs:
    with ctx.db.sessions() as session:
        job = session.scalar(select(JobRow).where(JobRow.id == lease.job_id))
        base = session.get(BaseModelRow, job.model)
        wanted = [job.training_file] + ([job.validation_file] if job.validation_file else [])
        files = {f.id: f for f in session.scalars(select(FileRow).where(FileRow.id.in_(wanted)))}
        tenant_name = session.get(Tenant, job.tenant_id).name
        resume = None
        if lease.attempt > 1 and job.last_checkpoint:
            resume = session.scalar(select(CheckpointRow).where(CheckpointRow.job_id == job.id,
                                                                CheckpointRow.storage_key == job.last_checkpoint))
    if base is None or any(f not in files for f in wanted):
        raise InputError("the job's base model or one of its files was deleted before it ran", param="training_file")
    return _Inputs(job, base.path, files, tenant_name, resume)


def _start(ctx: WorkerContext, lease: Lease, inputs: _Inputs) -> None:
    """Forget what dead attempts did past the checkpoint this one resumes from, then announce the start."""
    job, resume = inputs.job, inputs.resume
    step = resume.step if resume is not None else 0
    with lease.transaction() as session:
        session.execute(delete(JobEventRow).where(JobEventRow.job_id == job.id, JobEventRow.type == "metrics",
                                                  JobEventRow.step > step))
        session.execute(delete(CheckpointRow).where(CheckpointRow.job_id == job.id, CheckpointRow.step > step))
        kept = set(session.scalars(select(CheckpointRow.storage_key).where(CheckpointRow.job_id == job.id)))
        message = (f"Resuming from {resume.storage_key.rsplit('/', 1)[-1]} (attempt {lease.attempt})" if resume
                   else "Fine-tuning job started" if lease.attempt == 1 else f"Restarting (attempt {lease.attempt})")
        session.add(lease.event(message))
    ctx.artifacts.prune(job_key(job.tenant_id, job.id), kept | {attempt_key(job.tenant_id, job.id, lease.attempt)})


def prune_checkpoints(ctx: WorkerContext, job_id: str, keep: int, transaction) -> None:
    """Keep the job's newest `keep` checkpoint rows; delete the others, and their files.

    `transaction()`: the session to write in (`lease.transaction` while the job runs: fenced).
    The core already pruned this attempt's own directory to the same count; this catches the
    rows, and the checkpoints earlier attempts left (the one this attempt resumed from, say).
    """
    with transaction() as session:
        rows = session.execute(select(CheckpointRow.id, CheckpointRow.storage_key).where(
            CheckpointRow.job_id == job_id).order_by(CheckpointRow.step.desc())).all()
        dropped = rows[keep:]
        if dropped:
            session.execute(delete(CheckpointRow).where(CheckpointRow.id.in_([r.id for r in dropped])))
            session.commit()
    for row in dropped:
        ctx.artifacts.discard(row.storage_key)


class ProgressRecorder:
    """The core's progress callback: writes metrics, checkpoints and the ETA through the lease; True = stop."""

    def __init__(self, lease: Lease, attempt: str, flush_every_s: float = 1.0,
                 on_checkpoint: Callable[[], None] | None = None):
        self.lease, self.attempt, self.flush_every_s = lease, attempt, flush_every_s
        self.on_checkpoint = on_checkpoint
        self.pending: list = []
        self.last_flush = 0.0

    def __call__(self, p) -> bool:
        metrics = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "train_loss": p.loss,
                   "learning_rate": p.lr, "tokens_seen": p.tokens_seen, "tokens_per_s": p.tokens_per_s}
        text = f"Step {p.step}/{p.total_steps}: training loss={p.loss:.4f}"
        if p.val_loss is not None:
            metrics["valid_loss"] = p.val_loss
            text += f", validation loss={p.val_loss:.4f}"
        self.pending.append(self.lease.event(text, type="metrics", data=metrics, step=p.step))
        if p.checkpoint is not None or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush(p)
        return self.lease.should_stop

    def flush(self, p=None) -> None:
        """Write what is pending (raises `LeaseLost` when this attempt no longer owns the job)."""
        events, values, rows = self.pending, {}, []
        self.pending = []
        if p is not None:
            values = {"total_steps": p.total_steps, "estimated_finish": now() + int(p.eta_s)}
        if p is not None and p.checkpoint is not None:
            key = f"{self.attempt}/checkpoints/{p.checkpoint.name}"
            metrics = {"step": p.step, "train_loss": p.loss, "tokens_seen": p.tokens_seen}
            if p.val_loss is not None:
                metrics["valid_loss"] = p.val_loss
            rows.append(CheckpointRow(id=new_id("ftckpt"), job_id=self.lease.job_id, step=p.step, metrics=metrics,
                                      storage_key=key, created_at=now()))
            events.append(self.lease.event(f"Checkpoint saved at step {p.step}"))
            values["last_checkpoint"] = key
        self.lease.record([*rows, *events], **values)
        self.last_flush = time.monotonic()
        if rows and self.on_checkpoint is not None:
            self.on_checkpoint()


def _train(ctx: WorkerContext, lease: Lease) -> None:
    from adapters.training import train

    inputs = _load(ctx, lease)
    _start(ctx, lease, inputs)
    attempt = attempt_key(inputs.job.tenant_id, inputs.job.id, lease.attempt)
    keep = ctx.settings.keep_checkpoints
    recorder = ProgressRecorder(lease, attempt, on_checkpoint=(
        lambda: prune_checkpoints(ctx, lease.job_id, keep, lease.transaction)) if keep else None)
    cfg = training_config(ctx, inputs, attempt)
    base_model = base_models.get(inputs.base_path) if cfg.devices == 1 else None  # N ranks load their own
    result = train(cfg, progress=recorder, base_model=base_model,
                   should_stop=_stop_check(lease), on_start=lambda cfg: _record_chosen(lease, inputs.job, cfg))
    recorder.flush()
    if result.stopped:
        if lease.lost:
            raise LeaseLost(f"fine-tuning job {lease.job_id} stopped: lease lost")
        raise Cancelled(f"Fine-tuning job cancelled at step {result.steps}", trained_tokens=result.trained_tokens)
    _succeed(ctx, lease, inputs, attempt, result)


def _record_chosen(lease: Lease, job: JobRow, cfg) -> None:
    """What "auto" hyperparameters became, written on the job (what its object shows) with an event saying so:
    epochs, batch size and learning rate from the dataset; the sharding of N > 1 devices from the base's size."""
    hp, chosen, said = job.hyperparameters, dict(job.hyperparameters), []
    auto = [k for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if hp[k] == "auto"]
    if auto:
        chosen.update({"n_epochs": cfg.epochs, "batch_size": cfg.batch_size,
                       "learning_rate_multiplier": round(cfg.lr / BASE_LEARNING_RATE, 6), "learning_rate": cfg.lr})
        said.append("Hyperparameters chosen from the dataset: " + ", ".join(f"{k}={chosen[k]}" for k in auto))
    if cfg.devices > 1 and hp.get("sharding", "auto") == "auto":
        chosen["sharding"] = cfg.sharding  # settled by `adapters.distributed.launch` before the ranks started
        said.append(f"Sharding chosen for {cfg.devices} devices from the base's size: {cfg.sharding}")
    if said:
        lease.record([lease.event(message) for message in said], hyperparameters=chosen)


def _stop_check(lease: Lease, every_s: float = 1.0):
    """Asked between micro-batches: renews the lease (so a cancel is seen) at most every `every_s`."""
    renewed = time.monotonic()

    def should_stop() -> bool:
        nonlocal renewed
        if time.monotonic() - renewed >= every_s:
            renewed = time.monotonic()
            lease.renew()
        return lease.should_stop

    return should_stop


def _succeed(ctx: WorkerContext, lease: Lease, inputs: _Inputs, attempt: str, result) -> None:
    job = inputs.job
    adapter_id, file_id = new_id("adapter"), new_id("file")
    adapter_key = f"{attempt}/adapter"
    ctx.artifacts.import_dir(adapter_key, result.adapter_dir, names=ADAPTER_FILES)
    name = f"ft:{job.model}:{inputs.tenant_name}:{job.suffix or ''}:{job.id}"
    config = json.loads((result.adapter_dir / CONFIG_NAME).read_text())
    targets = config.get("target_modules")
    files = [file_digest(ctx.artifacts.local_path(adapter_key) / name) for name in ADAPTER_FILES]
    metrics = file_digest(Path(result.metrics_path))
    rows = [
        AdapterRow(id=adapter_id, tenant_id=job.tenant_id, name=name, base_model=job.model, rank=int(config["r"]),
                   target_modules=sorted(targets) if isinstance(targets, list) else [targets],
                   bytes=sum(f["bytes"] for f in files), files=files, job_id=job.id, fine_tuned_model=name,
                   storage_key=adapter_key, created_at=now()),
        FileRow(id=file_id, tenant_id=job.tenant_id, filename=f"{job.id}-{METRICS_NAME}", purpose="fine-tune-results",
                bytes=metrics["bytes"], sha256=metrics["sha256"], records=None,
                storage_key=f"{attempt}/{METRICS_NAME}", created_at=now()),
    ]
    final = {"step": result.steps, "train_loss": result.final_loss}
    if result.val_loss is not None:
        final["valid_loss"] = result.val_loss
    # the core never checkpoints the last step: the adapter is that checkpoint
    rows.append(CheckpointRow(id=new_id("ftckpt"), job_id=job.id, step=result.steps, storage_key=adapter_key,
                              metrics=final, created_at=now()))
    lease.succeed(rows=rows, events=[lease.event(f"New fine-tuned model created: {name}"),
                                     lease.event("The job has successfully completed")],
                  fine_tuned_model=name, adapter_id=adapter_id, trained_tokens=result.trained_tokens,
                  result_files=[file_id], estimated_finish=None)
    if ctx.settings.keep_checkpoints:  # the adapter's row is the newest of the `keep_checkpoints` kept
        # after the job succeeded, so a crash before it can still resume from the checkpoints; no worker holds it now
        prune_checkpoints(ctx, job.id, ctx.settings.keep_checkpoints, ctx.db.sessions)


def _given(value):
    """A hyperparameter as the core takes it: None where the job left it "auto"."""
    return None if value == "auto" else value


def _devices(ctx: WorkerContext, hp: dict) -> int:
    devices = hp.get("devices", 1)  # jobs created before multi-process training trained on one
    if devices > ctx.settings.worker_devices:
        raise InputError(f"the job asks for {devices} devices; this worker offers {ctx.settings.worker_devices}",
                         param="hyperparameters.devices", code="devices_unavailable")
    return devices


def training_config(ctx: WorkerContext, inputs: _Inputs, attempt: str):
    from adapters.training import TrainingConfig

    job, hp, lora = inputs.job, inputs.job.hyperparameters, inputs.job.lora
    devices = _devices(ctx, hp)

    def path(file_id: str) -> str:
        return str(ctx.artifacts.local_path(inputs.files[file_id].storage_key))

    targets = lora["target_modules"]
    return TrainingConfig(
        base=inputs.base_path, data=path(job.training_file), out=str(ctx.artifacts.local_path(attempt)),
        validation=path(job.validation_file) if job.validation_file else None,
        rank=lora["rank"], alpha=float(lora["alpha"]), dropout=float(lora["dropout"]),
        targets=targets if isinstance(targets, str) else tuple(targets), use_rslora=lora["use_rslora"],
        epochs=_given(hp["n_epochs"]), lr=hp.get("learning_rate"), batch_size=_given(hp["batch_size"]),
        grad_accum=hp["grad_accum"], max_seq_len=hp["max_seq_len"], packing=hp["packing"], seed=job.seed,
        save_every=hp["checkpoint_every"],  # None: once per epoch, as OpenAI checkpoints
        # no pruning in the core: `prune_checkpoints` prunes by the job's rows, after recording. N ranks run ahead of
        # the rows they report (the relay lags), and the core pruning its own directories deleted the checkpoint the
        # job's row still named as the last one when a worker was killed mid-job (seen in CI).
        max_rank=ctx.settings.max_rank,
        resume_from=str(ctx.artifacts.local_path(inputs.resume.storage_key)) if inputs.resume else None,
        cache_dir=str(ctx.settings.resolved_dataset_cache_dir),
        devices=devices,
        sharding=hp.get("sharding", "auto"),  # jobs created before FSDP have none
    )

