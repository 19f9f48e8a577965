"""`loramill serve | worker | tenant create | model add | demo`.

Embedded default: with no `LORAMILL_BROKER_URL`, `serve` starts a real Celery worker process
(`loramill worker --pool solo`) beside the API; both use kombu's `filesystem://` transport under
`<data_dir>/broker/` and the SQLite job store in `<data_dir>`, so one machine needs no Redis and
no PostgreSQL. That transport does not redeliver the task of a worker that died, so `serve`
enqueues again whatever was left `running` (`service.recovery`), and holds a lock so that only
one embedded worker serves a data directory. With a broker configured, `serve` runs the API only
and workers are started with `loramill worker --queues train` (GPU machines) / `--queues merge`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import click


def register(main: click.Group) -> None:
    for command in (serve, worker, tenant, model, demo):
        main.add_command(command)


def worker_command(queues: str, pool: str, concurrency: int) -> list[str]:
    return [sys.executable, "-c", "from loramill.cli import main; main()", "worker", "--queues", queues,
            "--pool", pool, "--concurrency", str(concurrency)]


@click.command()
@click.option("--host", default=None, help="Default: LORAMILL_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: LORAMILL_PORT (8000).")
def serve(host: str | None, port: int | None) -> None:
    """Run the HTTP API (and, with no broker configured, an embedded worker beside it)."""
    import uvicorn

    from loramill.settings import get_settings
    from service.app import create_app

    settings = get_settings()
    app = create_app(settings)  # migrates the job store before any worker starts
    embedded = None
    if not settings.broker_url:
        from service.recovery import hold_embedded_lock, requeue_orphans

        lock = hold_embedded_lock(settings.data_dir)  # noqa: F841 — held until the process exits
        services = app.state.services
        for orphan in requeue_orphans(services.db, services.queue):
            click.echo(f"re-enqueued {orphan}: it was running when the last embedded worker stopped", err=True)
        env = {**os.environ, "LORAMILL_DATA_DIR": str(settings.data_dir.resolve())}
        embedded = subprocess.Popen(worker_command("train,merge", "solo", 1), env=env)
        click.echo(f"embedded worker pid {embedded.pid} on {settings.data_dir.resolve() / 'broker'}", err=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through `finally` so the worker stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=host or settings.host, port=port or settings.port, log_level="warning")
    finally:
        if embedded is not None:
            embedded.send_signal(signal.SIGTERM)
            try:
                embedded.wait(timeout=30)
            except subprocess.TimeoutExpired:
                embedded.kill()


@click.command()
@click.option("--queues", default="train,merge", show_default=True, help="Comma-separated: train, merge.")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork", show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, pool: str, concurrency: int, loglevel: str) -> None:
    """Run a Celery worker for the configured broker (embedded filesystem transport when none)."""
    from adapters.errors import InputError
    from loramill.settings import get_settings
    from service.db import database, migrate
    from workers.celery_app import MERGE_QUEUE, TRAIN_QUEUE, app

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in (TRAIN_QUEUE, MERGE_QUEUE)]
    if unknown or not names:
        raise InputError(f"unknown queue {unknown[0] if unknown else queues!r}; use train, merge or train,merge", param="queues")
    url = get_settings().resolved_database_url
    migrate(url)
    database(url).engine.dispose()  # children of a prefork pool open their own connections
    app.worker_main(["worker", "-Q", ",".join(names), "-P", pool, "-c", str(concurrency), "-l", loglevel,
                     "-n", f"loramill-{'-'.join(names)}-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])


@click.group()
def tenant() -> None:
    """Manage tenants."""


@tenant.command("create")
@click.argument("name")
def tenant_create(name: str) -> None:
    """Create tenant NAME and print its API key (shown once; only its hash is stored)."""
    from loramill.settings import get_settings
    from service.auth import create_tenant
    from service.db import database, migrate

    url = get_settings().resolved_database_url
    migrate(url)
    with database(url).sessions() as session:
        row, key = create_tenant(session, name)
    click.echo(f"created tenant {row.name} ({row.id})", err=True)
    click.echo(key)


@click.group()
def model() -> None:
    """Manage base models."""


@model.command("add")
@click.argument("name")
@click.argument("path")
def model_add(name: str, path: str) -> None:
    """Register the checkpoint at PATH (local directory or hub id) as base model NAME."""
    from loramill.settings import get_settings
    from service.db import database, migrate
    from service.models_registry import register_base_model

    url = get_settings().resolved_database_url
    migrate(url)
    with database(url).sessions() as session:
        row = register_base_model(session, name, path)
    click.echo(f"registered base model {row.name} at {row.path}")


@click.command()
@click.option("--url", default=None, help="Use a running server (needs --api-key and --admin-key); default: start one.")
@click.option("--api-key", default=None)
@click.option("--admin-key", default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: <data_dir>/demo.")
def demo(url: str | None, api_key: str | None, admin_key: str | None, out: str | None) -> None:
    """Fine-tune and merge through the HTTP API end to end, then compare generations before and after."""
    from service.demo import run_demo

    run_demo(url=url, api_key=api_key, admin_key=admin_key, out=out)
