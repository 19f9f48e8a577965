"""The merge task's life cycle, in-process on a real job store: success, cancellation queued and running.

Merges are created through the real API route; `run_merge_job` is what the Celery task calls.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

import merge.streaming as streaming
from workers import merging
from jobs.tables import MergeRow
from tests.service.test_api import upload_adapter
from workers.context import context_for
from workers.merging import run_merge_job


@pytest.fixture
def ctx(api):
    return context_for(api.settings)


def create_merge(api, adapter_dir) -> str:
    adapter = upload_adapter(api, "alice", adapter_dir)
    assert adapter.status_code == 200, adapter.text
    merge = api.client.post("/v1/merges", headers=api.auth("alice"),
                            json={"base_model": "tiny", "adapters": [{"adapter": adapter.json()["id"], "weight": 1.0}]})
    assert merge.status_code == 200, merge.text
    return merge.json()["id"]


def merge_row(ctx, merge_id) -> MergeRow:
    with ctx.db.sessions() as session:
        return session.scalar(select(MergeRow).where(MergeRow.id == merge_id))


def cancel(api, merge_id):
    return api.client.post(f"/v1/merges/{merge_id}/cancel", headers=api.auth("alice"))


def test_merge_succeeds_lists_its_files_and_cannot_be_cancelled_after(api, ctx, peft_adapter):
    merge_id = create_merge(api, peft_adapter)
    assert run_merge_job(ctx, merge_id) == "succeeded"
    files = api.client.get(f"/v1/merges/{merge_id}/files", headers=api.auth("alice")).json()["data"]
    assert {"config.json", "model.safetensors.index.json", "loramill-manifest.json"} <= {f["name"] for f in files}
    response = cancel(api, merge_id)
    assert response.status_code == 409 and response.json()["error"]["code"] == "merge_finished"
    assert merge_row(ctx, merge_id).status == "succeeded"


def test_queued_merge_cancelled_never_runs(api, ctx, peft_adapter):
    merge_id = create_merge(api, peft_adapter)
    response = cancel(api, merge_id)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert run_merge_job(ctx, merge_id) == "cancelled"
    row = merge_row(ctx, merge_id)
    assert row.status == "cancelled" and row.finished_at is not None and row.files == []
    assert not ctx.artifacts.local_path(f"merges/{row.tenant_id}/{merge_id}").exists()


def test_running_merge_cancelled_stops_and_keeps_nothing(api, ctx, peft_adapter, monkeypatch):
    merge_id = create_merge(api, peft_adapter)
    responses = []

    def cancel_at_first_progress(self, done, total):  # the tenant cancels while the merge is writing
        if not responses:
            responses.append(cancel(api, merge_id))
        return progress(self, done, total)

    progress = merging.MergeProgress.__call__
    monkeypatch.setattr(merging.MergeProgress, "__call__", cancel_at_first_progress)
    monkeypatch.setattr(streaming, "BLOCK_ELEMENTS", 1024)  # many progress calls, so it stops part-way
    assert run_merge_job(ctx, merge_id) == "cancelled"
    assert responses[0].status_code == 200 and responses[0].json()["status"] == "running"  # flagged; the worker stops
    row = merge_row(ctx, merge_id)
    assert row.status == "cancelled" and row.files == [] and row.storage_key is None
    out = ctx.artifacts.local_path(f"merges/{row.tenant_id}/{merge_id}")
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temporary directory left either
    events = api.client.get(f"/v1/merges/{merge_id}/events", headers=api.auth("alice")).json()["data"]
    assert [e["message"] for e in events if e["type"] == "message"] == ["Merge cancelled; its partial output was discarded",
                                                  "Cancellation requested", "Merge started"]
