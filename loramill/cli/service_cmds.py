"""`loramill serve | worker | tenant create | model add | engines drain | demo`.

Embedded default: with no `LORAMILL_BROKER_URL`, `serve` runs a real Celery worker process beside
the API (`service.embedded`: restarted when it dies, killed when `serve` dies); both use kombu's
`filesystem://` transport under `<data_dir>/broker/` and the SQLite job store in `<data_dir>`, so
one machine needs no Redis and no PostgreSQL. With a broker configured, `serve` runs the API only
and workers are started with `loramill worker --queues train` (GPU machines) / `--queues merge`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import click


def register(main: click.Group) -> None:
    for command in (serve, worker, tenant, model, engines, demo):
        main.add_command(command)


@click.command()
@click.option("--host", default=None, help="Default: LORAMILL_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: LORAMILL_PORT (8000).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="API processes sharing the port (uvicorn workers). Default: LORAMILL_API_WORKERS (1).")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the HTTP API (and, with no broker configured, an embedded worker beside it).

    With --workers N, N API processes serve the port; this process only supervises them (and runs
    the embedded worker, once); embedded engines are shared by all of them (one per base), and
    /metrics sums the N processes (prometheus-client's multiprocess mode).
    """
    import uvicorn

    from loramill.settings import get_settings
    from service.app import create_app, reconciler_for
    from service.http_protocol import bounded_protocol

    settings = get_settings()
    app = create_app(settings)  # migrates the job store before any worker starts
    embedded = None
    if not settings.broker_url:
        from service.embedded import EmbeddedWorker, hold_embedded_lock, child_env

        lock = hold_embedded_lock(settings.data_dir)  # noqa: F841 — held until the process exits
        services = app.state.services
        reconciler = reconciler_for(services)
        reconciler.expire_all_leases()  # the lock is ours, and a worker dies with its serve: nobody runs them
        for job_id in reconciler.run_once():
            click.echo(f"re-enqueued {job_id}: it was running when the last embedded worker stopped", err=True)
        embedded = EmbeddedWorker(settings.data_dir, reconciler, child_env(settings.data_dir))
        services.probes["worker"] = embedded.probe
        embedded.start()
    workers = workers or settings.api_workers
    metrics_dir = _multiprocess_metrics_dir(settings.data_dir) if workers > 1 else None
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through `finally` so the worker stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = host or settings.host, settings.port if port is None else port
    if workers > 1:  # each process builds its own app from the same settings (service.app.create_served_app)
        server = None
        run = partial(uvicorn.run, "service.app:create_served_app", factory=True, workers=workers, host=host, port=port,
                      log_level="warning", http="service.http_protocol:SettingsBoundedProtocol")
        listening = partial(_connects, host, port)
    else:
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                               http=bounded_protocol(settings.max_header_bytes)))
        run = server.run
        listening = lambda: server.servers[0].sockets[0].getsockname()[:2] if server.started else None  # noqa: E731
    threading.Thread(target=_announce_when_ready, args=(listening, server, embedded, settings), daemon=True).start()
    try:
        run()
    finally:
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)  # PermissionError: alive, another user's
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _multiprocess_metrics_dir(data_dir: Path) -> Path:
    """A fresh `<data_dir>/prometheus/serve-<pid>` for this serve's API processes, in PROMETHEUS_MULTIPROC_DIR
    (their children inherit it; prometheus-client reads it when imported there). Directories left by
    serves that died are removed: their counts belong to no running server."""
    root = data_dir.resolve() / "prometheus"
    for old in root.glob("serve-*"):
        if not _alive(old.name.removeprefix("serve-")):  # else another serve on this data dir (with a broker)
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"serve-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _connects(host: str, port: int) -> tuple[str, int] | None:
    """(host, port) once something accepts connections there (the API processes of `serve --workers N`)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return None
    return host, port


def _announce_when_ready(listening, server, embedded, settings, worker_wait_s: float = 120) -> None:
    """Once the HTTP server listens (`listening()` gives its address) and the embedded worker consumes, print
    the URL and where the logs go."""
    from service.embedded import WORKER_LOG, engine_log_name

    while (address := listening()) is None:
        if server is not None and server.should_exit:
            return
        time.sleep(0.05)
    deadline = time.monotonic() + worker_wait_s
    while embedded is not None and time.monotonic() < deadline:
        try:
            embedded.probe()
            break
        except RuntimeError:
            time.sleep(0.1)
    host, port = address
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    data = settings.data_dir
    worker = f"worker {data / WORKER_LOG}; " if embedded is not None else ""
    engines = f"engines {data / engine_log_name('<base>')}" if settings.embedded_engines else "engines: their own"
    click.echo(f"loramill serve: ready on {url}/ (API {url}/v1, data in {data})\n"
               f"logs: API errors on this terminal; {worker}{engines}", err=True)


def _write_ready_file(path: str) -> None:
    """Once the worker consumes, write its pid to `path` (what `service.embedded` waits for)."""
    from celery.signals import worker_ready

    from adapters.fsutil import atomic_write_bytes

    @worker_ready.connect(weak=False)
    def _ready(**_kwargs) -> None:
        atomic_write_bytes(Path(path), str(os.getpid()).encode())


@click.command()
@click.option("--queues", default="train,merge", show_default=True, help="Comma-separated: train, merge.")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork", show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write the worker's pid here once it consumes.")
@click.option("--node-name", default=None, metavar="NAME@%h",
              help="Celery node name (what `celery inspect ping -d` names). Default: loramill-<queues>-<pid>@%h.")
def worker(queues: str, pool: str, concurrency: int, loglevel: str, ready_file: str | None,
           node_name: str | None) -> None:
    """Run a Celery worker for the configured broker (embedded filesystem transport when none)."""
    from adapters.errors import InputError
    from jobs.db import database, migrate
    from jobs.queue import QUEUES, worker_pool_config
    from loramill.settings import get_settings
    from workers.celery_app import app

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        raise InputError(f"unknown queue {unknown[0] if unknown else queues!r}; use {', '.join(QUEUES)} or both "
                         "comma-separated", param="queues")
    if ready_file is not None:
        _write_ready_file(ready_file)
    url = get_settings().resolved_database_url
    migrate(url)
    database(url).engine.dispose()  # children of a prefork pool open their own connections
    app.conf.update(worker_pool_config(pool))
    app.worker_main(["worker", "-Q", ",".join(names), "-P", pool, "-c", str(concurrency), "-l", loglevel,
                     "-n", node_name or f"loramill-{'-'.join(names)}-{os.getpid()}@%h", "--without-gossip",
                     "--without-mingle"])


@contextmanager
def _store():
    """A session on the configured job store, migrated to the newest schema.

    A command that fails creates nothing: when it made the SQLite store (and the directories
    holding it), they are removed again before the error is shown.
    """
    from adapters.fsutil import new_directories_removed_on_error
    from jobs.db import database, forget, migrate, sqlite_path
    from loramill.settings import get_settings

    url = get_settings().resolved_database_url
    path = sqlite_path(url)
    new_file = path is not None and not path.exists()
    with new_directories_removed_on_error(path.parent) if new_file else nullcontext():
        try:
            migrate(url)
            with database(url).sessions() as session:
                yield session
        except BaseException:
            if new_file:
                forget(url)  # close its connections before the file goes
                for suffix in ("", "-wal", "-shm", "-journal"):
                    path.with_name(path.name + suffix).unlink(missing_ok=True)
            raise


@click.group()
def tenant() -> None:
    """Manage tenants and their API keys."""


@tenant.command("create")
@click.argument("name")
def tenant_create(name: str) -> None:
    """Create tenant NAME and print its API key (shown once; only its hash is stored)."""
    from jobs.tenants import create_tenant

    with _store() as session:
        row, key = create_tenant(session, name)
    click.echo(f"created tenant {row.name} ({row.id})", err=True)
    click.echo(key)


@tenant.group("key")
def tenant_key() -> None:
    """Rotate keys: create a new one, move clients over, revoke the old one."""


@tenant_key.command("create")
@click.argument("tenant_name")
def key_create(tenant_name: str) -> None:
    """Print a new API key for TENANT_NAME (shown once); its other keys keep working."""
    from jobs.tenants import create_key

    with _store() as session:
        row, key = create_key(session, tenant_name)
    click.echo(f"created key {row.id} ({row.prefix}...) for tenant {tenant_name}", err=True)
    click.echo(key)


@tenant_key.command("list")
@click.argument("tenant_name")
def key_list(tenant_name: str) -> None:
    """The keys of TENANT_NAME: id, prefix, created, revoked."""
    from jobs.tenants import list_keys

    with _store() as session:
        for row in list_keys(session, tenant_name):
            revoked = f"revoked {row.revoked_at}" if row.revoked_at else "active"
            click.echo(f"{row.id}  {row.prefix}...  created {row.created_at}  {revoked}")


@tenant_key.command("revoke")
@click.argument("key_id")
def key_revoke(key_id: str) -> None:
    """Revoke key KEY_ID (`key-...`): it stops working in every API process within LORAMILL_TENANT_CACHE_TTL_S."""
    from jobs.tenants import revoke_key

    with _store() as session:
        row = revoke_key(session, key_id)
    click.echo(f"revoked key {row.id} ({row.prefix}...)")


@click.group()
def model() -> None:
    """Manage base models."""


@model.command("add")
@click.argument("name")
@click.argument("path")
def model_add(name: str, path: str) -> None:
    """Register the checkpoint at PATH (local directory or hub id) as base model NAME."""
    from jobs.base_models import register_base_model

    with _store() as session:
        row = register_base_model(session, name, path)
    click.echo(f"registered base model {row.name} at {row.path}")


@click.group()
def engines() -> None:
    """The inference engines API processes route to (LORAMILL_ENGINE_URLS): list, drain, resume."""


@engines.command("list")
def engines_list() -> None:
    """Each configured engine: base model, URL, drained or serving."""
    from jobs.engine_drains import drained, normalize_url
    from loramill.settings import get_settings

    with _store() as session:
        drained_urls = drained(session)
    configured = [(base, normalize_url(url)) for base, urls in get_settings().engine_urls.items() for url in urls]
    for base, url in configured:
        click.echo(f"{base}  {url}  {'drained' if url in drained_urls else 'serving'}")
    for url in sorted(drained_urls - {url for _, url in configured}):
        click.echo(f"-  {url}  drained (not in this process's LORAMILL_ENGINE_URLS)")


@engines.command("drain")
@click.argument("url")
def engines_drain(url: str) -> None:
    """Send engine URL no new request (running ones finish), from every API process within
    LORAMILL_ENGINE_PROBE_INTERVAL_S; its adapters are loaded on the other engines on demand."""
    from jobs.engine_drains import drain

    with _store() as session:
        row = drain(session, url)
    click.echo(f"drained {row.url}: no new requests after the next engine probe; `loramill engines resume` undoes it")


@engines.command("resume")
@click.argument("url")
def engines_resume(url: str) -> None:
    """Route requests to engine URL again (after `loramill engines drain`)."""
    from adapters.errors import InputError
    from jobs.engine_drains import resume

    with _store() as session:
        if not resume(session, url):
            raise InputError(f"engine {url} is not drained", param="url")
    click.echo(f"resumed {url}")


@click.command()
@click.option("--url", default=None, help="Use a running server (needs --api-key and --admin-key); default: start one.")
@click.option("--api-key", default=None)
@click.option("--admin-key", default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: <data_dir>/demo.")
@click.option("--keep-serving/--no-keep-serving", default=None,
              help="Keep the server it started running at the end, for the web console. Default: on a terminal.")
def demo(url: str | None, api_key: str | None, admin_key: str | None, out: str | None,
         keep_serving: bool | None) -> None:
    """Fine-tune and merge through the HTTP API end to end, then compare answers before and after."""
    from loramill.cli.demo import run_demo

    run_demo(url=url, api_key=api_key, admin_key=admin_key, out=out, keep_serving=keep_serving)
