"""The workers' Celery app (`celery -A workers.celery_app worker`, `loramill worker`).

Configured from the process's settings on first use, not at import, with the configuration the
API sends with (`jobs.queue.celery_config`): same broker, queues and delivery guarantees.
"""

from __future__ import annotations

from celery import Celery

from jobs.queue import celery_config
from loramill.settings import get_settings

app = Celery("loramill")


@app.on_configure.connect
def _configure(sender: Celery, **_kwargs) -> None:
    sender.conf.update(celery_config(get_settings()))
