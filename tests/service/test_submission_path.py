"""The job-creation fast path: what it writes, the ids it makes, how it publishes, how the server starts."""

from __future__ import annotations

import gc
import re

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from celery import Celery

from jobs.ids import new_id
from jobs.queue import TRAIN_QUEUE, TRAIN_TASK, JobQueue, celery_config
from jobs.redis_transport import PublishChannel
from jobs.tables import FileRow
from loramill.settings import Settings
from service.app import create_app
from tests.service.conftest import chat_lines
from tests.services import free_redis_url, release_redis


def test_a_created_job_reads_back_exactly_as_returned_with_its_two_events(api):
    train = api.upload("alice", chat_lines(12)).json()["id"]
    val = api.upload("alice", chat_lines(4, start=50)).json()["id"]
    body = {"model": "tiny", "training_file": train, "validation_file": val, "suffix": "s", "seed": 7,
            "metadata": {"k": "v"}, "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}}
    created = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"), json=body).json()
    stored = api.client.get(f"/v1/fine_tuning/jobs/{created['id']}", headers=api.auth("alice")).json()
    assert created == stored
    assert stored["validation_file"] == val and stored["lora"]["alpha"] == 8 and stored["seed"] == 7
    events = api.client.get(f"/v1/fine_tuning/jobs/{created['id']}/events", headers=api.auth("alice")).json()["data"]
    assert [e["message"] for e in events] == ["Files validated, moving job to queued state",
                                              f"Validating training file: {train}"]  # newest first


def test_the_same_file_may_be_training_and_validation_file(api):
    train = api.upload("alice", chat_lines(4)).json()["id"]
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                          json={"model": "tiny", "training_file": train, "validation_file": train}).json()
    assert job["training_file"] == job["validation_file"] == train


def test_a_file_of_another_purpose_is_refused_for_either_slot(api):
    train = api.upload("alice", chat_lines(4)).json()["id"]
    other = new_id("file")  # uploads take only purpose=fine-tune; such files come from elsewhere
    with api.app.state.services.db.sessions() as session:
        tenant_id = session.scalars(select(FileRow.tenant_id).where(FileRow.id == train)).one()
        session.add(FileRow(id=other, tenant_id=tenant_id, filename="o.jsonl", purpose="assistants", bytes=1, records=1,
                            storage_key="none", created_at=0))
        session.commit()
    for slot in ("training_file", "validation_file"):
        body = {"model": "tiny", "training_file": train, slot: other}
        response = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"), json=body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == slot and response.json()["error"]["code"] == "invalid_file_purpose"


def test_ids_are_the_prefix_and_24_letters_or_digits_and_do_not_repeat():
    ids = [new_id("ftjob") for _ in range(20_000)]
    assert all(re.fullmatch(r"ftjob-[A-Za-z0-9]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({c for i in ids for c in i[6:]}) == 62  # every character of the alphabet occurs


@pytest.fixture
def redis_queue(tmp_path):
    broker = free_redis_url()
    yield JobQueue(Settings(data_dir=tmp_path / "data", broker_url=broker)), broker
    release_redis(broker)


def test_with_redis_the_api_publishes_plain_celery_messages_through_one_client_per_channel(redis_queue, tmp_path):
    queue, broker = redis_queue
    queue.send(TRAIN_QUEUE, TRAIN_TASK, "ftjob-a")
    queue.send(TRAIN_QUEUE, TRAIN_TASK, "ftjob-b")
    with queue.celery.producer_pool.acquire(block=True) as producer:
        channel = producer.channel
        assert isinstance(channel, PublishChannel)
        assert channel._create_client() is channel._create_client()
    assert redis.Redis.from_url(broker).llen(TRAIN_QUEUE) == 2

    worker_app = Celery("worker", set_as_current=False)  # the stock transport, as workers consume
    worker_app.conf.update(celery_config(Settings(data_dir=tmp_path / "worker", broker_url=broker)))
    with worker_app.connection_for_read() as conn, conn.SimpleQueue(TRAIN_QUEUE) as simple:
        received = [simple.get(timeout=5) for _ in range(2)]
        for message in received:
            message.ack()
    assert [(m.headers["task"], m.payload[0]) for m in received] == [(TRAIN_TASK, ["ftjob-a"]),
                                                                     (TRAIN_TASK, ["ftjob-b"])]


def test_a_serving_process_freezes_its_startup_objects(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))
    gc.unfreeze()
    try:
        with TestClient(app) as client:  # runs the lifespan, as uvicorn does
            assert gc.get_freeze_count() > 10_000
            assert client.get("/healthz").status_code == 200
    finally:
        gc.unfreeze()
