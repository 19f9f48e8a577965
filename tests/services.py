"""Real Redis, RabbitMQ and PostgreSQL for tests: check they answer, start them if not (a fresh CI machine).

The start commands are the ones in design.md "Services on these machines". Each test session
gets its own PostgreSQL database (`loramill_test_<random>`, dropped afterwards), and each test
that uses a broker an empty Redis database number or a RabbitMQ virtual host of its own
(`loramill-test-<random>`, deleted afterwards), so parallel runs never see each other's messages.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from bench import procs
from bench.procs import REDIS, free_port, release_redis, stop, wait_http  # noqa: F401 — the tests' names for them

POSTGRES = ("127.0.0.1", 5432)
RABBITMQ = ("127.0.0.1", 5672)
BROKERS = ("redis", "rabbitmq")
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _answers(addr: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(addr, timeout=1):
        return True
    return False


def _wait(addr: tuple[str, int], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _answers(addr):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up on {addr[0]}:{addr[1]}")


def ensure_redis() -> None:
    if not _answers(REDIS):
        os.makedirs("/var/lib/redis", exist_ok=True)
        os.makedirs("/var/log/redis", exist_ok=True)
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
                        "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"], check=True)
        _wait(REDIS, "redis")


def ensure_rabbitmq() -> None:
    if not _answers(RABBITMQ):  # the Debian wrapper runs the node as the rabbitmq user
        subprocess.run(["rabbitmq-server", "-detached"], check=True)
        _wait(RABBITMQ, "rabbitmq", timeout_s=90)
        subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True)


def ensure_postgres() -> None:
    if not _answers(POSTGRES):
        (version,) = [os.path.basename(p) for p in glob.glob("/etc/postgresql/*")]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
        _wait(POSTGRES, "postgresql")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database for this session; yields its SQLAlchemy URL and drops it at the end."""
    from sqlalchemy import create_engine, text

    ensure_postgres()
    name = f"loramill_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from jobs.db import _databases

        for url in [u for u in _databases if u.endswith(f"/{name}")]:
            _databases.pop(url).engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_redis_url() -> str:
    """A URL for an empty Redis database number (1-15) of the local Redis, started first if it is down."""
    ensure_redis()
    return procs.free_redis_url()


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A new virtual host that guest may use; yields its broker URL and deletes it (queues and all) at the end."""
    ensure_rabbitmq()
    name = f"loramill-test-{secrets.token_hex(4)}"
    for command in (["add_vhost", name], ["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *command], check=True, capture_output=True)
    try:
        yield f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=True, capture_output=True)


@contextlib.contextmanager
def fresh_broker(kind: str) -> Iterator[str]:
    """A broker URL (`kind` in `BROKERS`) that no other test or run uses, emptied afterwards."""
    if kind == "rabbitmq":
        with rabbitmq_vhost() as url:
            yield url
        return
    url = free_redis_url()
    try:
        yield url
    finally:
        release_redis(url)


LORAMILL = [sys.executable, "-c", "from loramill.cli import main; main()"]  # the CLI of this checkout's interpreter


def loramill_env(data_dir, **settings: str) -> dict[str, str]:
    """This process's environment without any LORAMILL_ setting, then the data dir and `settings` (LORAMILL_ + upper)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env["LORAMILL_DATA_DIR"] = str(data_dir)
    env.update({f"LORAMILL_{k.upper()}": v for k, v in settings.items()})
    return env


def loramill(env: dict[str, str], *args: str, cwd=None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAMILL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def start_serve(env: dict[str, str], log_path, *args: str, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`loramill serve` on a free port with `args`, output appended to `log_path`; `(process, url)` once /readyz answers."""
    port = free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen([*LORAMILL, "serve", "--port", str(port), *args], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", process, timeout_s=timeout_s)
    return process, url


@contextlib.contextmanager
def loramill_serve(env: dict[str, str], log_path, timeout_s: float = 180):
    """`loramill serve --port 0` (embedded worker); yields `(url, ready_line)` from the line it prints once ready."""
    import re

    with open(log_path, "ab") as log:
        server = subprocess.Popen([*LORAMILL, "serve", "--port", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            text = open(log_path, encoding="utf-8", errors="replace").read()
            found = re.search(r"^loramill serve: ready on (http://\S+?)/ .*$", text, re.MULTILINE)
            if found:
                yield found.group(1), found.group(0)
                return
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"loramill serve did not say it was ready (exit {server.poll()}):\n{text[-3000:]}")
            time.sleep(0.2)
    finally:
        stop(server)
