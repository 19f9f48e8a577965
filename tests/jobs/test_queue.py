"""The job queue on a real RabbitMQ: what was sent survives a restart of the broker, and sending goes on after it."""

from __future__ import annotations

import subprocess

import pytest

from jobs.queue import MERGE_QUEUE, MERGE_TASK, TRAIN_QUEUE, TRAIN_TASK, JobQueue
from loramill.settings import Settings
from tests.jobs.test_lifecycle import drain
from tests.services import ensure_rabbitmq, rabbitmq_vhost


@pytest.mark.slow
def test_messages_survive_a_rabbitmq_restart_and_the_sender_reconnects(tmp_path):
    """Quorum queues keep their messages on disk through a whole node restart (not just its app), and the
    API's pooled connection, cut by the restart, is opened again by the next send instead of failing it."""
    with rabbitmq_vhost() as url:
        queue = JobQueue(Settings(data_dir=tmp_path / "data", broker_url=url))
        drain(queue)
        queue.send(TRAIN_QUEUE, TRAIN_TASK, "ftjob-before")
        queue.send(MERGE_QUEUE, MERGE_TASK, "merge-before")
        subprocess.run(["rabbitmqctl", "-q", "shutdown"], check=True, capture_output=True)
        ensure_rabbitmq()  # the node was down: started again as on a fresh CI machine
        queue.send(TRAIN_QUEUE, TRAIN_TASK, "ftjob-after")
        assert queue.depths() == {TRAIN_QUEUE: 2, MERGE_QUEUE: 1}
        assert drain(queue) == [(MERGE_TASK, "merge-before"), (TRAIN_TASK, "ftjob-after"), (TRAIN_TASK, "ftjob-before")]
