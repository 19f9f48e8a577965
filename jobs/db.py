"""Engine, sessions and migrations for the job store.

`database(url)` returns the process-wide `Database` for a URL: an engine plus a session factory.
SQLite (the embedded default) runs in WAL mode with a busy timeout so the API and a worker
process can share one file; PostgreSQL is used as is (`postgresql+psycopg://…`; a bare
`postgresql://` URL is given the psycopg driver) with a pool that pings only connections that
sat idle (`ping_after_idle`). `migrate(url)` brings the schema to the newest alembic revision
and is called by every entry point that needs the database.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
PING_AFTER_IDLE_S = 5.0


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


_databases: dict[str, Database] = {}
_lock = threading.Lock()


def normalize_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def database(url: str) -> Database:
    """The cached `Database` for `url` (one engine and connection pool per process and URL)."""
    url = normalize_url(url)
    with _lock:
        if url not in _databases:
            _databases[url] = _open(url)
        return _databases[url]


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def forget(url: str) -> None:
    """Close the process's connections to `url` and drop its cached `Database` (before its file is removed)."""
    with _lock:
        db = _databases.pop(normalize_url(url), None)
    if db is not None:
        db.engine.dispose()


def _open(url: str) -> Database:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001 — DBAPI callback
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = create_engine(url, pool_size=10, max_overflow=20)
        ping_after_idle(engine, PING_AFTER_IDLE_S)
    return Database(engine, sessionmaker(engine, expire_on_commit=False))


def ping_after_idle(engine: Engine, idle_s: float) -> None:
    """At checkout, ping a pooled connection only if it sat in the pool for `idle_s` or longer.

    `pool_pre_ping=True` pings on every checkout: one more round trip on every request. Connections die while they sit idle (a database restart, a firewall's idle
    timeout), and that is what this catches: a failed ping discards every pooled connection
    (the database most likely restarted) and the checkout retries on a new one, so the request
    never sees it. A connection that dies while busy fails the statement it was running;
    SQLAlchemy then discards the pool's older connections, so the requests after it reconnect.
    """

    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_conn, record) -> None:  # noqa: ANN001 — pool callback
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy) -> None:  # noqa: ANN001 — pool callback
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 — whatever the driver raises, this connection is unusable
            raise InvalidatePoolError(f"pooled connection failed its ping after {idle_s:g}+ s idle: {exc}") from exc


def migrate(url: str) -> None:
    """Upgrade the schema at `url` to alembic's head (idempotent; PostgreSQL serialises concurrent callers)."""
    from alembic import command
    from alembic.config import Config

    db = database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7251843)"))  # one migrator at a time
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
