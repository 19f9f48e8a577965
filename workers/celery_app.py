"""The Celery app, configured from `loramill.settings` (read when the config is first needed).

Broker: `LORAMILL_BROKER_URL` (Redis in production). With none configured the app uses kombu's
`filesystem://` transport under `<data_dir>/broker/`: messages are files, so the API process and
a worker process on one machine share a queue with no server at all. That is the embedded
default `loramill serve` runs; Redis and the embedded transport go through the same code.

Delivery: `task_acks_late` + `task_reject_on_worker_lost` + `worker_prefetch_multiplier=1`: a
message is acknowledged only when its task returns, so a worker that dies mid-job leaves the
job to be redelivered (Redis redelivers after `visibility_timeout`, which must exceed the
longest job) and the task resumes from the job's last checkpoint. Task state lives in the job
store, not in Celery results (`task_ignore_result`).

Queues: `train` (GPU workers) and `merge` (CPU/IO workers) so the two scale apart.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from loramill.settings import Settings, get_settings

TRAIN_QUEUE = "train"
MERGE_QUEUE = "merge"
TRAIN_TASK = "loramill.train"
MERGE_TASK = "loramill.merge"


def embedded_broker_dir(settings: Settings) -> Path:
    return (settings.data_dir / "broker").resolve()


def celery_config(settings: Settings) -> dict:
    """Celery settings for `settings`: Redis (or any broker URL) when configured, else the filesystem transport."""
    if settings.broker_url:
        broker, backend = settings.broker_url, settings.result_backend or settings.broker_url
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    else:
        folder = embedded_broker_dir(settings)
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        broker, backend = "filesystem://", settings.result_backend
        transport_options = {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                             "control_folder": str(folder / "control"), "store_processed": False}
    return {
        "broker_url": broker,
        "result_backend": backend,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": transport_options if backend == broker else {},
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_queues": tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (TRAIN_QUEUE, MERGE_QUEUE)),
        "task_default_queue": TRAIN_QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": TRAIN_QUEUE}, MERGE_TASK: {"queue": MERGE_QUEUE}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "imports": ("workers.tasks",),
    }


def create_celery(settings: Settings) -> Celery:
    """A Celery app for explicit settings (the API builds one per app instance to enqueue by task name)."""
    app = Celery("loramill", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


# The worker's app (`celery -A workers.celery_app worker`, `loramill worker`): configured from the
# process's settings on first use, not at import.
app = Celery("loramill")


@app.on_configure.connect
def _configure(sender: Celery, **_kwargs) -> None:
    sender.conf.update(celery_config(get_settings()))
