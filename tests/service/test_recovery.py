"""Embedded default: work orphaned by a dead worker is enqueued again when `serve` starts, once per data dir."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from adapters.errors import InputError
from service.recovery import hold_embedded_lock, requeue_orphans
from service.tables import JobRow, MergeRow
from tests.service.conftest import chat_lines
from tests.service.test_api import upload_adapter
from workers.celery_app import MERGE_QUEUE, TRAIN_QUEUE


def take_all(queue, name: str) -> list[tuple[str, str]]:
    """Consume every message waiting in queue `name` of the filesystem broker: [(task name, first arg)]."""
    taken = []
    with queue.celery.connection_for_read() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue=name, no_ack=True)) is not None:
            args = message.decode()[0]
            taken.append((message.headers["task"], args[0]))
    return taken


def test_running_jobs_and_merges_are_enqueued_again_and_nothing_else(api, peft_adapter):
    services = api.app.state.services
    f = api.upload("alice", chat_lines(8)).json()
    jobs = [api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                            json={"model": "tiny", "training_file": f["id"]}).json()["id"] for _ in range(3)]
    adapter = upload_adapter(api, "alice", peft_adapter).json()
    merge = api.client.post("/v1/merges", headers=api.auth("alice"),
                            json={"base_model": "tiny", "adapters": [{"adapter": adapter["id"]}]}).json()["id"]
    # the filesystem transport orders messages by millisecond, then at random: compare as sets
    assert sorted(arg for _, arg in take_all(services.queue, TRAIN_QUEUE)) == sorted(jobs)  # a worker took them all ...
    assert [arg for _, arg in take_all(services.queue, MERGE_QUEUE)] == [merge]
    with services.db.sessions() as session:  # ... and died: two jobs and the merge were running, one job had finished
        session.execute(update(JobRow).where(JobRow.id.in_(jobs[:2])).values(status="running"))
        session.execute(update(JobRow).where(JobRow.id == jobs[2]).values(status="succeeded"))
        session.execute(update(MergeRow).where(MergeRow.id == merge).values(status="running"))
        session.commit()

    assert requeue_orphans(services.db, services.queue) == [*jobs[:2], merge]
    assert sorted(take_all(services.queue, TRAIN_QUEUE)) == sorted([("loramill.train", jobs[0]), ("loramill.train", jobs[1])])
    assert take_all(services.queue, MERGE_QUEUE) == [("loramill.merge", merge)]


def test_a_second_embedded_serve_on_the_same_data_dir_is_refused(tmp_path):
    held = hold_embedded_lock(tmp_path / "data")
    with pytest.raises(InputError, match="another `loramill serve`"):
        hold_embedded_lock(tmp_path / "data")
    held.close()
    hold_embedded_lock(tmp_path / "data").close()  # free again once the first one is gone
