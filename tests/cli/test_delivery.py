"""Delivery guarantees seen from outside: signals, killed workers, and bad messages."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from aqueue.app import App
from aqueue.broker.redis_kombu import KombuRedisBroker
from aqueue.broker.sqlite import SQLiteBroker
from aqueue.exceptions import NotRegistered
from aqueue.message import Envelope, Message, encode_message
from aqueue.serialization import get_serializer

from .conftest import Project, project_for

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "redis", "kombu"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """The command-line tests' projects, and one on Redis in kombu's layout (Celery's lists)."""
    with project_for(request.param, tmp_path) as project:
        yield project


async def wait_for_lines(path: Path, count: int, timeout: float = 20.0) -> list[str]:
    """The lines of ``path`` once it has at least ``count`` of them."""
    with anyio.fail_after(timeout):
        while True:
            lines = path.read_text().split() if path.exists() else []
            if len(lines) >= count:
                return lines
            await anyio.sleep(0.05)


async def test_sigterm_lets_the_running_task_finish(project: Project, client: App) -> None:
    # Given: a worker running a 2 s task
    worker = await project.start_worker()
    mark = project.root / "runs.txt"
    result = await client.send_task("tasks.sleep", [2], {"mark": str(mark)})
    await wait_for_lines(mark, 1)

    # When: it is told to stop
    worker.send_signal(signal.SIGTERM)

    # Then: the task finishes and its result is stored, and the worker exits 0
    assert await worker.wait(timeout=20) == 0
    assert await result.get(timeout=5) == 2
    assert mark.read_text().split() == ["start", "done"]
    assert "warm shutdown" in worker.log


async def test_sigterm_past_the_grace_period_requeues_the_task(project: Project) -> None:
    # Given: acks_late, a worker with a 1 s grace period, running a 3 s task
    project.write_tasks(task_acks_late=True)
    worker = await project.start_worker("--shutdown-timeout", "1")
    mark = project.root / "runs.txt"
    async with project.app() as client:
        result = await client.send_task("tasks.sleep", [3], {"mark": str(mark)})
        await wait_for_lines(mark, 1)

        # When: it is told to stop
        worker.send_signal(signal.SIGTERM)

        # Then: it exits 0 after the grace period without finishing the task
        assert await worker.wait(timeout=15) == 0
        assert mark.read_text().split() == ["start"]

        # And: the task went back to the queue: a second worker runs it
        await project.start_worker("-n", "second@test")
        assert await result.get(timeout=20) == 3
    assert mark.read_text().split() == ["start", "start", "done"]


async def test_sigterm_past_the_grace_period_requeues_an_early_acked_task(
    sqlite_project: Project, sqlite_client: App
) -> None:
    # Given: the default early ack, a worker with a 1 s grace period, running a 3 s task
    worker = await sqlite_project.start_worker("--shutdown-timeout", "1")
    mark = sqlite_project.root / "runs.txt"
    result = await sqlite_client.send_task("tasks.sleep", [3], {"mark": str(mark)})
    await wait_for_lines(mark, 1)

    # When
    assert await worker.stop(signal.SIGTERM, timeout=15) == 0

    # Then: it is not lost: a second worker runs it
    await sqlite_project.start_worker("-n", "second@test")
    assert await result.get(timeout=20) == 3
    assert mark.read_text().split() == ["start", "start", "done"]
    assert f"Task tasks.sleep[{result.id}] was cut short by shutdown" in worker.log


async def test_sigkill_mid_task_is_redelivered_with_acks_late(project: Project) -> None:
    # Given: acks_late with a 1 s visibility timeout, and a worker running a 2 s task
    project.write_tasks(task_acks_late=True, broker_transport_options={"visibility_timeout": 1})
    worker = await project.start_worker()
    mark = project.root / "runs.txt"
    async with project.app() as client:
        result = await client.send_task("tasks.sleep", [2], {"mark": str(mark)})
        await wait_for_lines(mark, 1)

        # When: the worker is killed outright
        assert await worker.stop(signal.SIGKILL) == -signal.SIGKILL

        # Then: another worker runs the task again once the claim lapses, and its result is stored
        await project.start_worker("-n", "second@test")
        assert await result.get(timeout=25) == 2
    assert mark.read_text().split() == ["start", "start", "done"]


async def test_long_acks_late_task_is_not_redelivered_while_its_worker_lives(sqlite_project: Project) -> None:
    # Given: a 0.5 s visibility timeout, two workers, and a task running for 2 s
    sqlite_project.write_tasks(task_acks_late=True, broker_transport_options={"visibility_timeout": 0.5})
    await sqlite_project.start_worker("-n", "w1@test")
    await sqlite_project.start_worker("-n", "w2@test")
    mark = sqlite_project.root / "runs.txt"
    async with sqlite_project.app() as client:
        result = await client.send_task("tasks.sleep", [2], {"mark": str(mark)})

        # Then: the claim is renewed, so it runs once
        assert await result.get(timeout=20) == 2
    assert mark.read_text().split() == ["start", "done"]


async def test_bad_messages_do_not_stop_the_worker(project: Project, client: App) -> None:
    # Given: a running worker
    worker = await project.start_worker()
    queue = project.default_queue
    garbage_id, unknown_id, pickled_id = (str(uuid.uuid4()) for _ in range(3))
    unknown = Message(unknown_id, "tasks.nope", [1, 2])

    # When: garbage, a task nobody registered, and a pickle it does not accept arrive
    await client.broker.publish(
        [
            Envelope(garbage_id, queue, b"\x00\xff not json at all", "application/json"),
            Envelope(unknown_id, queue, encode_message(unknown, get_serializer("json")), "application/json"),
            Envelope(pickled_id, queue, b"\x80\x04K\x01.", "application/x-python-serialize"),
        ]
    )

    # Then: each is logged with its id and not run
    await worker.wait_for(garbage_id)
    log = await worker.wait_for(unknown_id)
    assert "tasks.nope" in log
    await worker.wait_for(pickled_id)

    # And: the unregistered task is recorded as failed, so a waiting client gets an answer
    failure = await client.AsyncResult(unknown_id).get(timeout=10, propagate=False)
    assert isinstance(failure, NotRegistered)
    if isinstance(client.broker, SQLiteBroker | KombuRedisBroker):
        dead = {envelope.id for envelope in await client.broker.dead_letters(queue)}
        assert dead == {garbage_id, unknown_id, pickled_id}

    # And: the worker goes on running tasks
    assert await client.send_task("tasks.add", [4, 4]).get(timeout=20) == 8
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log
    assert await worker.stop() == 0


async def test_warm_shutdown_starts_no_new_task(sqlite_project: Project, sqlite_client: App) -> None:
    # Given: a worker running one task at a time, with two more tasks waiting for its slot
    worker = await sqlite_project.start_worker("-c", "1")
    mark = sqlite_project.root / "runs.txt"
    sent = [await sqlite_client.send_task("tasks.sleep", [1], {"mark": str(mark)}) for _ in range(3)]
    await wait_for_lines(mark, 1)
    for result in sent:
        await worker.wait_for(f"Task tasks.sleep[{result.id}] received")

    # When: it is told to stop while the first runs
    assert await worker.stop(signal.SIGTERM, timeout=15) == 0

    # Then: only the running task was finished; the waiting ones were left for another worker
    assert mark.read_text().split() == ["start", "done"]
    await sqlite_project.start_worker("-n", "second@test")
    assert [await result.get(timeout=20) for result in sent] == [1, 1, 1]
    assert sorted(mark.read_text().split()) == ["done"] * 3 + ["start"] * 3
