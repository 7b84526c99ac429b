"""A mixed fleet: real Celery 5.7 clients and workers beside aqueue workers and clients.

Each test has a project folder with an aqueue ``tasks.py`` and a Celery ``celerytasks.py`` on the same
queue (unique to the test, deleted after): on RabbitMQ with results in Redis (under a key prefix unique
to the test) or over ``rpc://``, or on Redis in kombu's layout (``broker_transport_options={"layout":
"kombu"}`` on the aqueue side, the same key prefix on both) with results in Redis. Celery runs as real
processes: ``celery worker --pool threads`` and a Celery client script that prints what
``result.get()`` gave (tests/cli/celery_side.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import aqueue
from aqueue import states
from aqueue.broker import Broker, from_url
from aqueue.broker.amqp import AMQPBroker
from aqueue.broker.redis_kombu import KombuRedisBroker
from aqueue.exceptions import NotRegistered, TaskRevokedError
from tests.conftest import require_server

from .celery_side import AQUEUE_TASKS, celery_client, celery_env, prepare, start_celery_worker
from .conftest import AMQP_HOST, Project

pytestmark = pytest.mark.slow

REDIS_RESULTS = pytest.mark.parametrize("mixed", ["redis", "kombu"], indirect=True)
KOMBU = {"broker_transport_options": {"layout": "kombu"}}


@pytest.fixture(params=["redis", "rpc", "kombu"])
async def mixed(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Project]:
    """A project with both sides' files: on the shared RabbitMQ with results in Redis or over rpc://,
    or (``kombu``) on Redis in kombu's layout with results in Redis."""
    require_server("redis")
    if request.param == "kombu":
        project = Project(tmp_path, "redis")
        prepare(project)
        project.write_tasks(AQUEUE_TASKS, **KOMBU)
        try:
            yield project
        finally:
            await project.aclose()
        return
    require_server("amqp")
    project = Project(tmp_path, "amqp")
    if request.param == "rpc":
        project.backend_url = "rpc://"
    prepare(project)
    project.write_tasks(AQUEUE_TASKS)
    try:
        yield project
    finally:
        await project.aclose()
        await delete_queues(project.default_queue)


@asynccontextmanager
async def broker_of(project: Project) -> AsyncIterator[Broker]:
    """The project's broker, connected, as the aqueue side sees it."""
    async with from_url(project.broker_url, project.settings.get("broker_transport_options")) as broker:
        yield broker


async def delete_native_delayed_delivery() -> None:
    """Delete what a Celery worker declares for its "native delayed delivery" once it sees a quorum queue."""
    levels = [f"celery_delayed_{level}" for level in range(28)]
    async with AMQPBroker(f"{AMQP_HOST}//") as broker:
        channel = await broker.channel()
        for name in levels:
            await channel.queue_delete(name)
        for name in [*levels, "celery_delayed_delivery"]:
            await channel.exchange_delete(name)
        await channel.close()


async def delete_queues(queue: str) -> None:
    """Delete ``queue``'s delay queues (``<queue>.delay.<ms>``), which other processes declared."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    names = [n for n in out.decode().split() if n.startswith(f"{queue}.delay.")]
    if names:
        async with AMQPBroker(f"{AMQP_HOST}//") as broker:
            channel = await broker.channel()
            for name in names:
                await channel.queue_delete(name)
            await channel.close()


# Celery client -> aqueue worker ---------------------------------------------------------------------


async def test_a_celery_client_gets_an_aqueue_workers_results(mixed: Project) -> None:
    # Given an aqueue worker on the queue a Celery client sends to
    worker = await mixed.start_worker("-c", "10")
    # When the Celery client sends tasks, with countdown, eta and expires, one of a name nobody registered
    calls: list[dict[str, Any]] = [
        {"task": "tasks.nope", "args": [1]},
        {"task": "tasks.add", "args": [4, 4]},
        {"task": "tasks.decline", "args": ["card 42"]},
        {"task": "tasks.fail", "args": ["bad"]},
        {"task": "tasks.add", "args": [1, 2], "options": {"countdown": 2}},
        {"task": "tasks.add", "args": [2, 3], "eta_in": 2},
        {"task": "tasks.add", "args": [5, 5], "options": {"countdown": 3, "expires": 1}},
        {"task": "tasks.add", "args": [6, 6], "options": {"priority": 9}},
    ]
    nope, add, decline, fail, countdown, eta, expired, prioritized = await celery_client(mixed, calls)
    # Then Celery's result.get() returns the aqueue worker's results
    assert (add.state, add.result) == (states.SUCCESS, 8)
    assert (prioritized.state, prioritized.result) == (states.SUCCESS, 12)
    # And re-raises its exceptions as their own classes, with their messages
    assert decline.error == {"type": "PaymentDeclined", "module": "shared_errors", "args": ["card 42"]}
    assert fail.error == {"type": "ValueError", "module": "builtins", "args": ["bad"]}
    # And the countdown and the eta were honoured, and the expired task was revoked, not run
    for delayed, value in ((countdown, 3), (eta, 5)):
        assert (delayed.state, delayed.result) == (states.SUCCESS, value)
        assert delayed.done is not None and delayed.done - delayed.sent >= 2.0
    assert (expired.state, expired.error and expired.error["type"]) == (states.REVOKED, "TaskRevokedError")
    # And the unregistered task was refused as aqueue refuses it: not run, failed, kept as a dead letter
    assert nope.error == {"type": "NotRegistered", "module": "celery.exceptions", "args": ["tasks.nope"]}
    await worker.wait_for(f"Received unregistered task of type 'tasks.nope' (id {nope.id})")
    async with broker_of(mixed) as broker:
        assert [e.id for e in await broker.dead_letters(mixed.default_queue)] == [nope.id]
        if isinstance(broker, KombuRedisBroker):  # and on Redis nothing is left held in kombu's hash
            assert await broker._client.hlen(broker.unacked_key) == 0
    assert worker.proc.poll() is None


# aqueue client -> Celery worker ---------------------------------------------------------------------


async def test_an_aqueue_client_gets_a_celery_workers_results(
    mixed: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Celery worker on the queue an aqueue client sends to (which imports the same exceptions)
    from_aqueue = mixed.root / "shared_errors.py"
    monkeypatch.syspath_prepend(str(from_aqueue.parent))
    from shared_errors import PaymentDeclined  # type: ignore[import-not-found]

    celery = await start_celery_worker(mixed)
    async with mixed.app() as client:
        # When the aqueue client sends tasks, with countdown, eta and expires, one of a name nobody registered
        sent = time.time()
        nope = client.send_task("tasks.nope", [1])
        add = client.send_task("tasks.add", [4, 4])
        decline = client.send_task("tasks.decline", ["card 42"])
        countdown = client.send_task("tasks.add", [1, 2], countdown=2)
        eta = client.send_task("tasks.add", [2, 3], eta=datetime.now(UTC) + timedelta(seconds=2))
        expired = client.send_task("tasks.add", [5, 5], countdown=3, expires=1)
        prioritized = client.send_task("tasks.add", [6, 6], priority=9)
        # Then await result.get() returns the Celery worker's results
        assert await add.get(timeout=20) == 8
        assert await prioritized.get(timeout=20) == 12
        # And re-raises its exceptions as their own classes, with their messages
        with pytest.raises(PaymentDeclined, match="card 42"):
            await decline.get(timeout=20)
        # And the countdown and the eta were honoured, and the expired task was revoked, not run
        for delayed, value in ((countdown, 3), (eta, 5)):
            assert await delayed.get(timeout=20) == value
            assert delayed.date_done is not None and delayed.date_done.timestamp() - sent >= 2.0
        with pytest.raises(TaskRevokedError, match="expired"):
            await expired.get(timeout=20)
        # And the unregistered task was refused as Celery refuses it, and the client told so
        with pytest.raises(NotRegistered, match=r"tasks\.nope"):
            await nope.get(timeout=20)
    await celery.wait_for("Received unregistered task of type 'tasks.nope'")
    assert celery.proc.poll() is None


# Workflows across the two sides ---------------------------------------------------------------------


@REDIS_RESULTS
async def test_a_link_written_in_celery_runs_after_an_aqueue_worker_ran_the_task(mixed: Project) -> None:
    # Given an aqueue worker, and a Celery client that links a callback to a task
    worker = await mixed.start_worker()
    mark = mixed.root / "links.txt"
    (mixed.root / "link_client.py").write_text(
        "import sys\nfrom celerytasks import add, record\n"
        f"result = add.apply_async((2, 2), link=record.s({str(mark)!r}))\n"
        "print(result.get(timeout=20))\n"
    )
    run = await mixed.run([sys.executable, "link_client.py"], env=celery_env(mixed))
    assert run.returncode == 0, run.output
    # Then the aqueue worker ran the callback with the task's result
    await _lines(mark, ["aqueue 4"])
    assert worker.proc.poll() is None


@REDIS_RESULTS
async def test_a_link_written_in_aqueue_runs_on_a_celery_worker(mixed: Project) -> None:
    celery = await start_celery_worker(mixed)
    mark = mixed.root / "links.txt"
    async with mixed.app() as client:
        link = aqueue.signature("tasks.record", args=(str(mark),))
        result = client.send_task("tasks.add", [2, 2], link=link)
        assert await result.get(timeout=20) == 4
    await _lines(mark, ["celery 4"])
    assert celery.proc.poll() is None


@REDIS_RESULTS
async def test_a_chain_started_in_celery_ends_on_an_aqueue_worker(mixed: Project) -> None:
    # Given a Celery worker and an aqueue worker on the queue, the aqueue one the only one for record
    await mixed.start_worker()
    mark = mixed.root / "chain.txt"
    (mixed.root / "chain_client.py").write_text(
        "from celery import chain\nfrom celerytasks import add, record\n"
        f"print(chain(add.s(1, 2), add.s(3), record.s({str(mark)!r})).apply_async().get(timeout=20))\n"
    )
    run = await mixed.run([sys.executable, "chain_client.py"], env=celery_env(mixed))
    assert run.returncode == 0, run.output
    await _lines(mark, ["aqueue 6"])


@REDIS_RESULTS
async def test_a_chain_started_in_aqueue_ends_on_a_celery_worker(mixed: Project) -> None:
    await start_celery_worker(mixed)
    mark = mixed.root / "chain.txt"
    async with mixed.app():
        signature = aqueue.signature
        workflow = aqueue.chain(
            signature("tasks.add", args=(1, 2)),
            signature("tasks.add", args=(3,)),
            signature("tasks.record", args=(str(mark),)),
        )
        assert await workflow.apply_async().get(timeout=20) == 6
    await _lines(mark, ["celery 6"])


@REDIS_RESULTS
async def test_celery_and_aqueue_workers_share_a_queue_and_run_each_task_once(mixed: Project) -> None:
    # Given a Celery worker and an aqueue worker on the same queue
    await start_celery_worker(mixed)
    await mixed.start_worker()
    mark = mixed.root / "runs.txt"
    # When a Celery client sends 40 tasks
    calls = [{"task": "tasks.record", "args": [i, str(mark)]} for i in range(40)]
    results = await celery_client(mixed, calls)
    # Then every one ran once, on one side or the other, and its result came back
    assert [r.result for r in results] == list(range(40))
    runs = mark.read_text().split("\n")[:-1]
    assert sorted(int(line.split()[1]) for line in runs) == list(range(40))


async def _lines(path: Path, expected: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().split("\n")[:-1] == expected:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{path} holds {path.read_text() if path.exists() else 'nothing'!r}, not {expected!r}")


# Queue declarations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"},
        {"task_queue_max_priority": 10},
    ],
    ids=["classic", "quorum", "priority"],
)
async def test_queue_declarations_agree_both_ways(
    settings: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an aqueue app and a Celery client with the same queue settings
    require_server("amqp")
    require_server("redis")
    project = Project(tmp_path, "amqp")
    prepare(project)
    project.write_tasks(AQUEUE_TASKS, **settings)
    celery_first, aqueue_first = project.default_queue, f"{project.default_queue}-b"
    try:
        async with project.app() as app:
            # When aqueue declares one queue first (by publishing to it)
            await app.send_task("tasks.add", [1, 1], queue=aqueue_first)
            # And Celery declares the other, and publishes to both
            calls = [
                {"task": "tasks.add", "args": [2, 2], "nowait": True},
                {"task": "tasks.add", "args": [3, 3], "options": {"queue": aqueue_first}, "nowait": True},
            ]
            await celery_client(project, calls, **settings)
            # And aqueue publishes to the queue Celery declared
            with caplog.at_level(logging.WARNING, logger="aqueue.broker.amqp"):
                await app.send_task("tasks.add", [4, 4], queue=celery_first)
        # Then neither declaration failed: Celery published (above), aqueue declared without a warning
        assert "exists with other arguments" not in caplog.text
        async with AMQPBroker(project.broker_url) as broker:
            channel = await broker.channel()
            for queue, count in ((celery_first, 2), (aqueue_first, 2)):
                declared = await channel.declare_queue(queue, passive=True, robust=False)
                assert declared.declaration_result.message_count == count
            await channel.close()
    finally:
        project.close()
        async with AMQPBroker(project.broker_url) as broker:
            for queue in (celery_first, aqueue_first):
                await broker.delete_queue(queue)


async def test_celery_and_aqueue_share_quorum_queues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given quorum queues on both sides (Celery's task_default_queue_type)
    require_server("amqp")
    require_server("redis")
    quorum = {"task_default_queue_type": "quorum"}
    project = Project(tmp_path, "amqp")
    prepare(project)
    project.write_tasks(AQUEUE_TASKS, **quorum)
    monkeypatch.syspath_prepend(str(project.root))
    from shared_errors import PaymentDeclined

    try:
        # When a Celery client sends to an aqueue worker, with a countdown
        worker = await project.start_worker()
        calls: list[dict[str, Any]] = [
            {"task": "tasks.add", "args": [4, 4]},
            {"task": "tasks.add", "args": [1, 2], "options": {"countdown": 1}},
            {"task": "tasks.decline", "args": ["card 7"]},
        ]
        add, countdown, decline = await celery_client(project, calls, **quorum)
        # Then Celery gets the results
        assert (add.result, countdown.result) == (8, 3)
        assert countdown.done is not None and countdown.done - countdown.sent >= 1.0
        assert decline.error is not None and decline.error["type"] == "PaymentDeclined"
        await worker.stop()
        # And when an aqueue client sends to a Celery worker on the same quorum queue
        await start_celery_worker(project, **quorum)
        async with project.app() as client:
            assert await client.send_task("tasks.add", [2, 2]).get(timeout=20) == 4
            with pytest.raises(PaymentDeclined):
                await client.send_task("tasks.decline", ["card 8"]).get(timeout=20)
    finally:
        await project.aclose()
        await delete_queues(project.default_queue)
        await delete_native_delayed_delivery()
