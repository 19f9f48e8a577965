"""Run one merge: the body of the `loramill.merge` task, on the shared life cycle (`jobs.lifecycle`).

`merge.streaming.merge_streaming` writes the checkpoint into a temporary directory beside its
key in the artifact store and renames it into place when complete, renewing the lease (a fenced
write) just before the rename; an attempt first removes the temporary directories a dead attempt
left there. Progress is renewed through the lease at most every `RENEW_EVERY_S`, which is also
when a cancellation request is noticed (the merge then stops, and its partial output is
discarded). The manifest's file list (name, bytes, sha256) is copied into the merge row for
listings and download headers.
"""

from __future__ import annotations

import hashlib
import time

from sqlalchemy import select

from adapters.errors import InputError
from jobs import lifecycle
from jobs.artifacts import merge_key
from jobs.lifecycle import MERGE, Cancelled, Lease, LeaseLost
from jobs.tables import AdapterRow, BaseModelRow, MergeRow
from workers.context import WorkerContext

RENEW_EVERY_S = 0.5
PROGRESS_EVENT_EVERY_S = 5.0


def run_merge_job(ctx: WorkerContext, merge_id: str) -> str:
    """Merge `merge_id` to an end (or leave it to the worker that holds it); returns its status."""
    return lifecycle.run(ctx.db, MERGE, merge_id, lambda lease: _merge(ctx, lease),
                         ttl_s=ctx.settings.lease_ttl_s, worker=ctx.name)


class MergeProgress:
    """`merge_streaming`'s progress callback: renews the lease, logs progress now and then; True = stop."""

    def __init__(self, lease: Lease):
        self.lease = lease
        self.next_renewal = self.next_event = 0.0

    def __call__(self, done: int, total: int) -> bool:
        clock = time.monotonic()
        if clock >= self.next_renewal:
            self.next_renewal = clock + RENEW_EVERY_S
            events = []
            if clock >= self.next_event:
                self.next_event = clock + PROGRESS_EVENT_EVERY_S
                events.append(self.lease.event(f"Merged {done / max(total, 1):.0%} of {total} bytes", type="metrics",
                                               data={"bytes_done": done, "bytes_total": total}))
            self.lease.record(events)
        return self.lease.should_stop


def _merge(ctx: WorkerContext, lease: Lease) -> None:
    from merge.manifest import MANIFEST_NAME
    from merge.streaming import AdapterRef, MergeCancelled, merge_streaming

    with ctx.db.sessions() as session:
        row = session.scalar(select(MergeRow).where(MergeRow.id == lease.job_id))
        base = session.get(BaseModelRow, row.base_model)
        ids = [a["adapter_id"] for a in row.request["adapters"]]
        adapters = {a.id: a for a in session.scalars(select(AdapterRow).where(AdapterRow.id.in_(ids)))}
    missing = [i for i in ids if i not in adapters]
    if base is None or missing:
        raise InputError(f"adapter {missing[0]} was deleted before the merge ran" if missing
                         else "the base model was unregistered before the merge ran", param="adapters")
    key = merge_key(row.tenant_id, row.id)
    ctx.artifacts.remove_temporaries(key)
    lease.record([lease.event("Merge started" if lease.attempt == 1 else f"Merge restarted (attempt {lease.attempt})")])
    opts = row.request
    refs = [AdapterRef(ctx.artifacts.local_path(adapters[a["adapter_id"]].storage_key), a["weight"])
            for a in opts["adapters"]]
    try:
        result = merge_streaming(base.path, refs, ctx.artifacts.local_path(key), method=opts["method"],
                                 dtype=opts["dtype"], max_shard_size=opts["max_shard_size"], density=opts["density"],
                                 drop_rate=opts["drop_rate"], rank=opts["rank"], seed=opts["seed"], overwrite=True,
                                 progress=MergeProgress(lease), durable=True, before_commit=lambda _tmp: lease.renew())
    except MergeCancelled:
        if lease.lost:
            raise LeaseLost(f"merge {lease.job_id} stopped: lease lost") from None
        raise Cancelled("Merge cancelled; its partial output was discarded") from None
    files = [{"name": f["name"], "bytes": f["size"], "sha256": f["sha256"]} for f in result.manifest["files"]]
    manifest = result.out_dir / MANIFEST_NAME
    files.append({"name": MANIFEST_NAME, "bytes": manifest.stat().st_size,
                  "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()})
    lease.succeed(events=[lease.event(f"Merged into {len(files)} files")], files=files, storage_key=key,
                  bytes=sum(f["bytes"] for f in files))
