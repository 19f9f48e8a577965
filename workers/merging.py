"""Run one merge: the body of the `loramill.merge` task.

The merged checkpoint is written by `merge.streaming.merge_streaming` straight into the artifact
store (it writes to a temporary directory, fsyncs it and renames), and the manifest's file list
(name, bytes, sha256) is copied into the merge row for listing and download headers.
The merge's progress callback reads the row's `cancel_requested` at most every
`CANCEL_POLL_S`; once set, the merge stops, its partial output is discarded and the row
moves to `cancelled`.
"""

from __future__ import annotations

import hashlib
import logging
import time

from sqlalchemy import select

from adapters.errors import InputError
from service.store import FINISHED, move
from service.tables import AdapterRow, BaseModelRow, MergeRow
from workers.context import WorkerContext

log = logging.getLogger(__name__)
MANIFEST = "loramill-manifest.json"
CANCEL_POLL_S = 0.5


class CancelPoll:
    """`merge_streaming`'s progress callback: True once the merge row's cancellation is requested."""

    def __init__(self, ctx: WorkerContext, merge_id: str):
        self.ctx, self.merge_id = ctx, merge_id
        self.next_poll = 0.0

    def __call__(self, done: int, total: int) -> bool:
        if time.monotonic() < self.next_poll:
            return False
        self.next_poll = time.monotonic() + CANCEL_POLL_S
        with self.ctx.db.sessions() as session:
            return bool(session.scalar(select(MergeRow.cancel_requested).where(MergeRow.id == self.merge_id)))


def run_merge_job(ctx: WorkerContext, merge_id: str) -> str:
    with ctx.db.sessions() as session:
        row = session.scalar(select(MergeRow).where(MergeRow.id == merge_id))
        if row is None or row.status in FINISHED:
            return row.status if row else "missing"
        if not move(session, MergeRow, merge_id, ("queued", "running"), "running", started_at=row.started_at or time.time()):
            return row.status
        session.commit()
        base = session.get(BaseModelRow, row.base_model)
        ids = [a["adapter_id"] for a in row.request["adapters"]]
        adapters = {a.id: a for a in session.scalars(select(AdapterRow).where(AdapterRow.id.in_(ids)))}
        key = f"merges/{row.tenant_id}/{merge_id}"
    try:
        missing = [i for i in ids if i not in adapters]
        if base is None or missing:
            raise InputError(f"adapter {missing[0]} was deleted before the merge ran" if missing
                             else "the base model was unregistered before the merge ran", param="adapters")
        from merge.streaming import AdapterRef, MergeCancelled, merge_streaming

        opts = row.request
        refs = [AdapterRef(ctx.artifacts.local_path(adapters[a["adapter_id"]].storage_key), a["weight"])
                for a in opts["adapters"]]
        try:
            result = merge_streaming(base.path, refs, ctx.artifacts.local_path(key), method=opts["method"],
                                     dtype=opts["dtype"], max_shard_size=opts["max_shard_size"], density=opts["density"],
                                     drop_rate=opts["drop_rate"], rank=opts["rank"], seed=opts["seed"], overwrite=True,
                                     progress=CancelPoll(ctx, merge_id), durable=True)
        except MergeCancelled:
            with ctx.db.sessions() as session:
                move(session, MergeRow, merge_id, ("running",), "cancelled")
                session.commit()
            return "cancelled"
        files = [{"name": f["name"], "bytes": f["size"], "sha256": f["sha256"]} for f in result.manifest["files"]]
        manifest = result.out_dir / MANIFEST
        if manifest.exists() and all(f["name"] != MANIFEST for f in files):
            files.append({"name": MANIFEST, "bytes": manifest.stat().st_size,
                          "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()})
    except InputError as exc:
        return _fail(ctx, merge_id, exc.code or "invalid_request", str(exc), exc.param)
    except Exception as exc:  # noqa: BLE001 — any crash fails the merge with its message
        log.exception("merge %s crashed", merge_id)
        return _fail(ctx, merge_id, "internal_error", f"{type(exc).__name__}: {exc}", None)
    with ctx.db.sessions() as session:
        move(session, MergeRow, merge_id, ("running",), "succeeded", files=files, storage_key=key)
        session.commit()
    return "succeeded"


def _fail(ctx: WorkerContext, merge_id: str, code: str, message: str, param: str | None) -> str:
    with ctx.db.sessions() as session:
        move(session, MergeRow, merge_id, ("queued", "running"), "failed",
             error={"code": code, "message": message, "param": param})
        session.commit()
    return "failed"
