"""Rows rendered as OpenAI's JSON objects (and loramill's own, in the same style); their schemas are in
`service.responses`, which the routes validate them against."""

from __future__ import annotations

from typing import Any

from jobs.tables import AdapterRow, BaseModelRow, CheckpointRow, Event, FileRow, JobRow, MergeRow


def listing(data: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def file_object(row: FileRow) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at, "filename": row.filename,
            "purpose": row.purpose, "status": "processed", "status_details": None, "expires_at": None}


def job_object(row: JobRow, tenant_name: str | None = None) -> dict[str, Any]:
    hp = row.hyperparameters
    openai_hp = {"n_epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                 "learning_rate_multiplier": hp["learning_rate_multiplier"]}
    return {
        "id": row.id, "object": "fine_tuning.job", "created_at": row.created_at, "finished_at": row.finished_at,
        "model": row.model, "organization_id": row.tenant_id, "status": row.status,
        "training_file": row.training_file, "validation_file": row.validation_file,
        "hyperparameters": openai_hp, "fine_tuned_model": row.fine_tuned_model, "trained_tokens": row.trained_tokens,
        "result_files": row.result_files, "seed": row.seed, "error": row.error, "estimated_finish": row.estimated_finish,
        "integrations": [], "metadata": row.metadata_, "user_provided_suffix": row.suffix,
        "method": {"type": "supervised", "supervised": {"hyperparameters": openai_hp}},
        "lora": row.lora, "adapter_id": row.adapter_id,
        "loramill_hyperparameters": {"max_seq_len": hp["max_seq_len"], "grad_accum": hp["grad_accum"],
                                     "packing": hp["packing"], "checkpoint_every": hp["checkpoint_every"],
                                     "learning_rate": hp.get("learning_rate"),  # set once the multiplier is known
                                     "devices": hp.get("devices", 1), "sharding": hp.get("sharding", "auto")},
    }


def event_object(row: Event, object_name: str = "fine_tuning.job.event") -> dict[str, Any]:
    return {"id": row.id, "object": object_name, "created_at": row.created_at, "level": row.level,
            "message": row.message, "type": row.type, "data": row.data}


def checkpoint_object(row: CheckpointRow, fine_tuned_model: str | None) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.checkpoint", "created_at": row.created_at,
            "fine_tuning_job_id": row.job_id, "step_number": row.step, "metrics": row.metrics,
            "fine_tuned_model_checkpoint": f"{fine_tuned_model or row.job_id}:ckpt-step-{row.step}"}


def model_object(name: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def base_model_object(row: BaseModelRow) -> dict[str, Any]:
    return model_object(row.name, row.created_at, "system")


def adapter_model_object(row: AdapterRow) -> dict[str, Any]:
    """An adapter as a model the tenant can ask: named by its fine-tuned model name, or its id if uploaded."""
    return {**model_object(row.fine_tuned_model or row.id, row.created_at, row.tenant_id), "parent": row.base_model}


def adapter_object(row: AdapterRow) -> dict[str, Any]:
    return {"id": row.id, "object": "adapter", "name": row.name, "base_model": row.base_model, "rank": row.rank,
            "target_modules": row.target_modules, "bytes": row.bytes, "created_at": row.created_at,
            "fine_tuning_job_id": row.job_id, "fine_tuned_model": row.fine_tuned_model,
            "files": [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in row.files or []]}


def merge_object(row: MergeRow) -> dict[str, Any]:
    return {"id": row.id, "object": "merge", "created_at": row.created_at, "finished_at": row.finished_at,
            "status": row.status, "base_model": row.base_model, "error": row.error,
            **{k: row.request[k] for k in ("adapters", "method", "dtype", "max_shard_size", "density", "drop_rate",
                                            "rank", "seed")},
            "files": [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in row.files]}
