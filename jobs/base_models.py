"""Registering base models (admin over HTTP, or `loramill model add`)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from adapters.errors import InputError
from jobs.store import now
from jobs.tables import BaseModelRow
from jobs.tenants import check_name


def register_base_model(session: Session, name: str, path: str) -> BaseModelRow:
    """Check `path` is a loadable safetensors checkpoint (headers and config only) and register it as `name`."""
    from adapters.checkpoint import read_checkpoint, read_config, resolve_model_dir

    check_name(name, "model")
    if session.get(BaseModelRow, name) is not None:
        raise InputError(f"model {name!r} is already registered", param="name", code="model_exists")
    model_dir = resolve_model_dir(path)
    read_config(model_dir)
    read_checkpoint(model_dir)
    row = BaseModelRow(name=name, path=str(model_dir.resolve()), created_at=now())
    session.add(row)
    session.commit()
    return row
