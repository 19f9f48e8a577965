"""Registering base models (admin over HTTP, or `loramill model add`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.store import now
from jobs.tables import BaseModelRow
from jobs.tenants import check_name


def register_base_model(session: Session, name: str, path: str) -> BaseModelRow:
    """Check `path` is a loadable safetensors checkpoint (headers and config only) and register it as `name`.

    Works out the base's checkpoint key renames now (`adapters.layouts`: imports transformers, seconds),
    once, so that no adapter upload for it ever has to.
    """
    from adapters.checkpoint import read_checkpoint, read_config, resolve_model_dir

    check_name(name, "model")
    if session.get(BaseModelRow, name) is not None:
        raise InputError(f"model {name!r} is already registered", param="name", code="model_exists")
    from adapters.layouts import transformers_renames

    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    renames = transformers_renames(config, read_checkpoint(model_dir))
    row = BaseModelRow(name=name, path=str(model_dir.resolve()), created_at=now(), renames=renames)
    session.add(row)
    session.commit()
    return row


def checkpoint_bytes(path: str) -> int:
    """What a full copy of the checkpoint at `path` takes (its safetensors files): a merge's output size."""
    from adapters.checkpoint import safetensors_files

    return sum(file.stat().st_size for file in safetensors_files(Path(path)))


def _stamp(path: str) -> int:
    """Changes when the checkpoint's config does: what the caches below are keyed by."""
    return (Path(path) / "config.json").stat().st_mtime_ns


@lru_cache(maxsize=256)
def _context_length(path: str, _stamp: int) -> int | None:
    from adapters.checkpoint import read_config

    config = read_config(Path(path))
    return next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
                 if isinstance(config.get(k), int)), None)


def context_length(path: str) -> int | None:
    """The longest sequence the base model's config allows (None when it does not say)."""
    return _context_length(path, _stamp(path))


@lru_cache(maxsize=1024)
def _target_problem(path: str, _stamp: int, targets: str | tuple[str, ...]) -> str | None:
    from adapters.checkpoint import check_target_modules

    try:
        check_target_modules(Path(path), targets)
    except InputError as exc:
        return str(exc)
    return None


def check_targets(path: str, targets: str | tuple[str, ...]) -> None:
    """Refuse LoRA target modules the base lacks (`adapters.checkpoint.check_target_modules`), remembered per base."""
    problem = _target_problem(path, _stamp(path), targets)
    if problem is not None:
        raise InputError(problem, param="lora.target_modules", code="invalid_value")
