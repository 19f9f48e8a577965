"""PostgreSQL pool: connections are pinged only after sitting idle, and a dead idle one is replaced unseen."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from jobs.db import normalize_url, ping_after_idle
from tests.services import postgres_database


@pytest.fixture(scope="module")
def pg_url():
    with postgres_database() as url:
        yield normalize_url(url)


def _engine(url: str, idle_s: float):
    engine = create_engine(url, pool_size=2, max_overflow=0)
    ping_after_idle(engine, idle_s)
    pings = []
    ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda dbapi_conn: pings.append(1) or ping(dbapi_conn)
    return engine, pings


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(url: str, pid: int) -> None:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    admin.dispose()
    time.sleep(0.2)  # let the backend exit


def test_connections_in_steady_use_are_not_pinged(pg_url):
    engine, pings = _engine(pg_url, idle_s=60)
    for _ in range(5):
        _backend_pid(engine)
    assert pings == []
    engine.dispose()


def test_a_connection_idle_past_the_threshold_is_pinged_at_checkout(pg_url):
    engine, pings = _engine(pg_url, idle_s=0.05)
    _backend_pid(engine)
    _backend_pid(engine)
    assert pings == []  # checked out again at once
    time.sleep(0.1)
    _backend_pid(engine)
    assert pings == [1]
    engine.dispose()


def test_an_idle_connection_the_server_dropped_is_replaced_without_an_error(pg_url):
    engine, pings = _engine(pg_url, idle_s=0.05)
    pid = _backend_pid(engine)
    _terminate(pg_url, pid)
    assert _backend_pid(engine) != pid  # the ping failed, the pool reconnected, the caller saw nothing
    assert pings == [1]
    engine.dispose()


def test_a_connection_dropped_while_in_steady_use_fails_one_statement_then_the_pool_recovers(pg_url):
    """Without a ping, a dead connection surfaces once; SQLAlchemy then discards the pool's older connections."""
    engine, _ = _engine(pg_url, idle_s=60)
    pid = _backend_pid(engine)
    _terminate(pg_url, pid)
    with pytest.raises(OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert _backend_pid(engine) != pid
    engine.dispose()


def test_the_job_store_pool_pings_idle_connections(pg_url, monkeypatch):
    import jobs.db

    monkeypatch.setattr(jobs.db, "PING_AFTER_IDLE_S", 0.05)
    engine = jobs.db.database(pg_url).engine
    pid = _backend_pid(engine)
    _terminate(pg_url, pid)
    assert _backend_pid(engine) != pid
