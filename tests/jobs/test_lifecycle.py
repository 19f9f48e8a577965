"""The shared job life cycle on real SQLite and PostgreSQL stores: claims, leases that fence writes, cancel, reconcile
(on the embedded broker and on RabbitMQ)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select, update

from jobs.db import database, migrate
from jobs.errors import Conflict
from jobs.lifecycle import FINE_TUNING, LeaseLost, claim, new_event, request_cancel
from jobs.queue import QUEUES, JobQueue
from jobs.reconciler import Reconciler
from jobs.tables import JobEventRow, JobRow, MergeEventRow, MergeRow, Tenant
from loramill.settings import Settings
from tests.services import postgres_database, rabbitmq_vhost


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        migrate(url)
        yield database(url)
        return
    with postgres_database() as url:
        migrate(url)
        yield database(url)


def add_job(db, job_id: str = "ftjob-1", status: str = "queued") -> str:
    with db.sessions() as session:
        if session.get(Tenant, "tenant-1") is None:
            session.add(Tenant(id="tenant-1", name="t", created_at=0))
            session.flush()
        session.add(JobRow(id=job_id, tenant_id="tenant-1", model="m", training_file="file-1", hyperparameters={},
                           lora={}, method={}, seed=0, status=status, cancel_requested=False, result_files=[],
                           created_at=0, enqueued_at=time.time()))
        session.commit()
    return job_id


def job(db, job_id: str = "ftjob-1") -> JobRow:
    with db.sessions() as session:
        return session.scalar(select(JobRow).where(JobRow.id == job_id))


def messages(db, job_id: str = "ftjob-1") -> list[str]:
    with db.sessions() as session:
        return list(session.scalars(select(JobEventRow.message).where(JobEventRow.job_id == job_id)
                                    .order_by(JobEventRow.seq)))


def expire(db, job_id: str = "ftjob-1") -> None:
    with db.sessions() as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(lease_expires_at=0))
        session.commit()


def test_only_the_current_lease_holder_writes(db):
    add_job(db)
    a = claim(db, FINE_TUNING, "ftjob-1", ttl_s=60, worker="a")
    assert a is not None and a.attempt == 1
    assert claim(db, FINE_TUNING, "ftjob-1", ttl_s=60, worker="b") is None  # a duplicate delivery: not taken
    a.record([a.event("from a, while it holds the lease")], total_steps=10)
    expire(db)  # a stalls past its lease ...
    b = claim(db, FINE_TUNING, "ftjob-1", ttl_s=60, worker="b")  # ... and b takes the job over
    assert b is not None and b.attempt == 2

    with pytest.raises(LeaseLost):
        a.record([a.event("from a, after it lost the lease")], total_steps=99)
    with pytest.raises(LeaseLost):
        a.succeed(rows=[new_event(FINE_TUNING, "ftjob-1", "a's product")], trained_tokens=1)
    with pytest.raises(LeaseLost):
        a.fail("internal_error", "a crashed")
    assert a.lost and a.should_stop
    b.record([b.event("from b")], total_steps=20)
    b.succeed(events=[b.event("b finished")], trained_tokens=2)

    row = job(db)
    assert (row.status, row.total_steps, row.trained_tokens, row.error, row.worker) == ("succeeded", 20, 2, None, "b")
    assert row.lease_token is None and row.finished_at is not None
    assert messages(db) == ["from a, while it holds the lease", "from b", "b finished"]
    with pytest.raises(LeaseLost):
        b.renew()  # a finished job has no lease left


def test_concurrent_claims_of_one_job_give_one_lease(db):
    add_job(db)
    barrier, leases = threading.Barrier(8), []

    def take() -> None:
        barrier.wait()
        leases.append(claim(db, FINE_TUNING, "ftjob-1", ttl_s=60, worker=threading.current_thread().name))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([lease for lease in leases if lease is not None]) == 1 and job(db).attempts == 1


def test_cancel_reaches_the_running_worker_through_its_lease_and_refuses_finished_jobs(db):
    add_job(db, "ftjob-q")
    add_job(db, "ftjob-r")
    with db.sessions() as session:
        request_cancel(session, FINE_TUNING, "ftjob-q")
    assert job(db, "ftjob-q").status == "cancelled" and claim(db, FINE_TUNING, "ftjob-q", ttl_s=60, worker="w") is None
    lease = claim(db, FINE_TUNING, "ftjob-r", ttl_s=60, worker="w")
    lease.renew()
    assert not lease.cancel_requested
    with db.sessions() as session:
        request_cancel(session, FINE_TUNING, "ftjob-r")
    assert job(db, "ftjob-r").status == "running"
    lease.renew()
    assert lease.cancel_requested and lease.should_stop
    lease.finish_cancelled("stopped at step 3")
    with db.sessions() as session, pytest.raises(Conflict) as refused:
        request_cancel(session, FINE_TUNING, "ftjob-r")
    assert refused.value.code == "job_finished" and refused.value.param == "fine_tuning_job_id"
    assert messages(db, "ftjob-r") == ["Cancellation requested", "stopped at step 3"]


def test_a_heartbeat_keeps_a_lease_alive_through_a_long_step(db):
    add_job(db)
    lease = claim(db, FINE_TUNING, "ftjob-1", ttl_s=0.6, worker="a")
    with lease.heartbeat():
        time.sleep(1.5)  # two and a half lifetimes without a write of its own
        assert claim(db, FINE_TUNING, "ftjob-1", ttl_s=0.6, worker="b") is None
    lease.record([lease.event("still mine")])


@pytest.fixture(scope="module")
def rabbitmq_url():
    with rabbitmq_vhost() as url:
        yield url


@pytest.fixture(params=["filesystem", "rabbitmq"])
def queue(request, tmp_path):
    """The embedded filesystem broker, or RabbitMQ's quorum queues (a virtual host for this module, emptied first)."""
    if request.param == "filesystem":
        return JobQueue(Settings(data_dir=tmp_path / "data"))
    queue = JobQueue(Settings(data_dir=tmp_path / "data", broker_url=request.getfixturevalue("rabbitmq_url")))
    drain(queue)
    return queue


def drain(queue) -> list[tuple[str, str]]:
    taken = []
    with queue.celery.connection_for_read() as conn:
        channel = conn.default_channel
        for name in QUEUES:
            declared = queue.celery.amqp.queues[name].bind(channel)
            declared.declare()
            while (message := declared.get(no_ack=True)) is not None:
                taken.append((message.headers["task"], message.decode()[0][0]))
    return sorted(taken)


def test_the_reconciler_requeues_expired_leases_and_cancels_what_was_cancelled(db, queue):
    for job_id in ("ftjob-live", "ftjob-dead", "ftjob-cancel"):
        add_job(db, job_id)
        claim(db, FINE_TUNING, job_id, ttl_s=60, worker="w")
    with db.sessions() as session:
        request_cancel(session, FINE_TUNING, "ftjob-cancel")
    expire(db, "ftjob-dead")
    expire(db, "ftjob-cancel")
    reconciler = Reconciler(db, queue, interval_s=1, resend_after_s=60)

    assert reconciler.run_once() == ["ftjob-dead"]
    assert drain(queue) == [("loramill.train", "ftjob-dead")]
    assert (job(db, "ftjob-dead").status, job(db, "ftjob-cancel").status, job(db, "ftjob-live").status) == (
        "queued", "cancelled", "running")
    assert messages(db, "ftjob-dead")[-1] == "Its worker stopped responding; the job is queued again"
    assert reconciler.run_once() == []  # nothing twice
    second = claim(db, FINE_TUNING, "ftjob-dead", ttl_s=60, worker="w2")
    assert second.attempt == 2


def test_the_reconciler_resends_what_the_broker_lost_once_and_oldest_first(db, queue):
    for job_id in ("ftjob-old-1", "ftjob-old-2", "ftjob-new"):
        add_job(db, job_id)
    with db.sessions() as session:  # two were enqueued long ago; the broker has since lost every message
        session.execute(update(JobRow).where(JobRow.id.in_(["ftjob-old-1", "ftjob-old-2"])).values(enqueued_at=0))
        session.add(MergeRow(id="merge-1", tenant_id="tenant-1", base_model="m", request={}, status="queued", files=[],
                             created_at=0, enqueued_at=0))
        session.commit()
    queue.send("train", "loramill.train", "ftjob-new")  # only the newest job's message is still there
    reconciler = Reconciler(db, queue, interval_s=1, resend_after_s=30)

    assert sorted(reconciler.run_once()) == ["ftjob-old-1", "ftjob-old-2", "merge-1"]
    assert drain(queue) == [("loramill.merge", "merge-1"), ("loramill.train", "ftjob-new"),
                            ("loramill.train", "ftjob-old-1"), ("loramill.train", "ftjob-old-2")]
    assert reconciler.run_once() == []  # just resent: not again before `resend_after_s`
    with db.sessions() as session:
        assert session.scalar(select(MergeEventRow.id)) is None  # resending is silent: nothing changed for the job


def test_a_renewed_lease_is_never_requeued(db, queue):
    add_job(db)
    lease = claim(db, FINE_TUNING, "ftjob-1", ttl_s=60, worker="w")
    expire(db)
    lease.renew()  # the worker was slow, not dead: it renews before the reconciler's round
    assert Reconciler(db, queue, interval_s=1, resend_after_s=60).run_once() == []
    assert job(db).status == "running" and claim(db, FINE_TUNING, "ftjob-1", ttl_s=60, worker="x") is None
