"""Queues, task names and the Celery configuration, shared by the API (which sends) and the workers.

Broker: `LORAMILL_BROKER_URL`: Redis (`redis://`) or RabbitMQ (`amqp://`). With none configured,
kombu's `filesystem://` transport under `<data_dir>/broker/`: messages are files, so the API
process and a worker process on one machine share a queue with no server at all. That is the
embedded default `loramill serve` runs; every broker goes through the same code.

Delivery: `task_acks_late` + `task_reject_on_worker_lost` + `worker_prefetch_multiplier=1`: a
message is acknowledged only when its task returns. What a message cannot promise (the broker
may lose it, or hold it unacknowledged for a whole visibility timeout after its worker died) the
job store's leases and `jobs.reconciler` make good, so delivering a task twice must be — and is
— harmless: a task's first act is a conditional claim (`jobs.lifecycle`), and a message for a
job that is finished, or running under another worker's live lease, ends there and is
acknowledged. Task state lives in the job store, not in Celery results (`task_ignore_result`).

On RabbitMQ the queues are durable quorum queues (replicated, and a message survives a broker
restart), published with publisher confirms, so `send` returns only once the broker has the
message. A worker whose connection drops (killed, or its machine gone) has its unacknowledged
message requeued at once; the next worker to get it finds the job under the dead worker's
lease and acknowledges it, and the reconciler sends the job again when that lease expires.
Redeliveries therefore never run a job twice, and RabbitMQ's own delivery limit (20 by default
from 4.0) is a backstop, not a correctness need: a message it drops is resent by the
reconciler. Celery sees the quorum queues (`worker_detect_quorum_queues`) and gives each
consumer its own prefetch of 1 instead of a channel-global QoS, which quorum queues refuse.
RabbitMQ needs no result backend: none is configured unless `LORAMILL_RESULT_BACKEND` names one.

Sending: by task name, so the API never imports the workers' code (or torch), with
`ignore_result=True` (otherwise Celery's Redis result backend subscribes to a result channel per
task sent). With a Redis broker, sends go through `jobs.redis_transport` (one redis-py client per
channel instead of one per message). Producers come from Celery's producer pool, so a request
opens no connection.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from loramill.settings import Settings

TRAIN_QUEUE = "train"
MERGE_QUEUE = "merge"
QUEUES = (TRAIN_QUEUE, MERGE_QUEUE)
TRAIN_TASK = "loramill.train"
MERGE_TASK = "loramill.merge"
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def embedded_broker_dir(settings: Settings) -> Path:
    return (settings.data_dir / "broker").resolve()


def is_amqp(broker_url: str | None) -> bool:
    return (broker_url or "").startswith(AMQP_SCHEMES)


def job_queues(*, amqp: bool) -> tuple[Queue, ...]:
    """The train and merge queues: durable, each bound to an exchange of its own by its name.

    On RabbitMQ: quorum queues, and topic exchanges (a routing key without wildcards routes as a
    direct one does), because Celery's native delayed delivery, which it sets up beside quorum
    queues, binds only topic exchanges and warns at every worker start about direct ones.
    """
    arguments = {"x-queue-type": "quorum"} if amqp else None
    kind = "topic" if amqp else "direct"
    return tuple(Queue(q, Exchange(q, type=kind), routing_key=q, durable=True, queue_arguments=arguments)
                 for q in QUEUES)


def celery_config(settings: Settings) -> dict:
    """Celery settings for `settings`: the configured broker URL, else the filesystem transport."""
    amqp = is_amqp(settings.broker_url)
    if amqp:
        broker, backend = settings.broker_url, settings.result_backend
        transport_options = {"confirm_publish": True}
    elif settings.broker_url:
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
        "worker_detect_quorum_queues": True,
        # Celery declares 28 native delayed-delivery queues beside quorum queues; no task here is
        # delayed (no countdown or eta), so classic ones (cheap, unreplicated) will do
        "broker_native_delayed_delivery_queue_type": "classic",
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_queues": job_queues(amqp=amqp),
        "task_default_queue": TRAIN_QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": TRAIN_QUEUE}, MERGE_TASK: {"queue": MERGE_QUEUE}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "imports": ("workers.tasks",),
    }


def worker_pool_config(pool: str) -> dict:
    """What a worker running Celery pool `pool` changes in `celery_config`.

    A solo worker runs each job on its event loop, which answers no AMQP heartbeats meanwhile:
    RabbitMQ would close its connection during any job longer than two heartbeat timeouts (2 min
    by default), and the job's message would come back and be acknowledged as a duplicate. A solo
    worker turns heartbeats off; the broker then notices a dead solo worker by its TCP connection,
    and its job comes back through the lease meanwhile. Prefork workers heartbeat from their main
    process while a child runs the job. Heartbeats are an AMQP matter: other brokers ignore this.
    """
    return {"broker_heartbeat": 0} if pool == "solo" else {}


class JobQueue:
    """Sends tasks by name to the configured broker; reports reachability and queue depths."""

    def __init__(self, settings: Settings):
        self.celery = Celery("loramill", set_as_current=False)
        self.celery.conf.update(celery_config(settings))
        if (settings.broker_url or "").startswith(("redis://", "rediss://")):
            from jobs.redis_transport import PublishTransport

            self.celery.conf.broker_transport = PublishTransport

    def send(self, queue: str, task: str, job_id: str) -> None:
        self.celery.send_task(task, args=[job_id], queue=queue, ignore_result=True)

    def ping(self) -> None:
        """Raise if the broker cannot be reached within a couple of seconds."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def depths(self) -> dict[str, int]:
        """Messages waiting in each queue (not counting ones a worker holds unacknowledged).

        Declared with the queues' own arguments: RabbitMQ refuses a declaration whose arguments
        differ from the existing queue's (a quorum queue declared as classic).
        """
        with self.celery.connection_for_read() as conn:
            channel = conn.default_channel
            return {q: self.celery.amqp.queues[q].bind(channel).queue_declare().message_count for q in QUEUES}
