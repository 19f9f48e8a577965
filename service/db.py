"""Engine, sessions and migrations for the job store.

`database(url)` returns the process-wide `Database` for a URL: an engine plus a session factory.
SQLite (the embedded default) runs in WAL mode with a busy timeout so the API and a worker
process can share one file; PostgreSQL is used as is (`postgresql+psycopg://…`; a bare
`postgresql://` URL is given the psycopg driver). `migrate(url)` brings the schema to the
newest alembic revision and is called by every entry point that needs the database.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


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
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    return Database(engine, sessionmaker(engine, expire_on_commit=False))


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
