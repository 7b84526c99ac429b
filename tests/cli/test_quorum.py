"""Worker processes on RabbitMQ quorum queues (Celery's task_default_queue_type = 'quorum').

The rest of the tour on quorum queues is in tests/test_tour.py (transport ``amqp+quorum``); queue
declarations and a mixed fleet on quorum queues are in tests/cli/test_celery.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aqueue.broker.amqp import AMQPBroker
from tests.conftest import require_server

from .conftest import Project
from .test_fleet import collect, runs_by_worker, sigkill_mid_task_is_run_by_the_other_worker, write_tasks

pytestmark = pytest.mark.slow

QUORUM = {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"}


@pytest.fixture
async def quorum_project(tmp_path: Path) -> AsyncIterator[Project]:
    """A project on the shared RabbitMQ whose queues are quorum queues, results in Redis."""
    require_server("amqp")
    require_server("redis")
    project = Project(tmp_path, "amqp")
    try:
        yield project
    finally:
        await project.aclose()
        async with AMQPBroker(project.broker_url) as broker:
            await broker.delete_queue(f"{project.default_queue}-classic")


async def is_quorum(project: Project, queue: str) -> bool:
    async with AMQPBroker(project.broker_url) as broker:
        channel = await broker.channel()
        try:
            await channel.declare_queue(
                queue, durable=True, arguments={"x-queue-type": "quorum"}, robust=False
            )
            return True
        except Exception:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()


async def test_sigkill_mid_task_on_a_quorum_queue_is_run_by_the_other_worker(quorum_project: Project) -> None:
    # Given: acks_late on quorum queues, two workers, and a 2 s task running on one of them; when that
    # worker is killed outright, then RabbitMQ gives the task to the other, which runs it
    await sigkill_mid_task_is_run_by_the_other_worker(quorum_project, task_acks_late=True, **QUORUM)
    assert await is_quorum(quorum_project, quorum_project.default_queue)


async def test_a_worker_consumes_classic_and_quorum_queues_together(quorum_project: Project) -> None:
    # Given: a quorum queue and a classic one (Celery's task_queues), one worker consuming both
    default, classic = quorum_project.default_queue, f"{quorum_project.default_queue}-classic"
    task_queues = {default: {"queue_arguments": {"x-queue-type": "quorum"}}, classic: {}}
    write_tasks(quorum_project, task_queues=task_queues)
    queues = f"{default},{classic}"
    worker = await quorum_project.start_worker("-Q", queues, "-c", "20", "--prefetch-multiplier", "1")
    # When: tasks are sent to each
    async with quorum_project.app() as client:
        sent = [client.send_task("tasks.record", [n], queue=classic if n % 2 else None) for n in range(40)]
        # Then: all of them run, once
        assert await collect(sent, timeout=30) == list(range(40))
    assert sorted(runs_by_worker(quorum_project)[worker.pid]) == list(range(40))
    assert [await is_quorum(quorum_project, q) for q in (default, classic)] == [True, False]
