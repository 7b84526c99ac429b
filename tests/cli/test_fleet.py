"""Delivery guarantees of real worker processes on Redis and RabbitMQ: crowds, crashes, restarts.

Runs are counted by the tasks themselves, in files the test reads: ``record`` appends its argument
to a file named after the worker's pid, ``slow`` appends ``start <pid>`` and ``done <pid>`` lines.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import aqueue
from aqueue.app import App
from aqueue.message import Envelope
from aqueue.result.asyncresult import AsyncResult
from tests.conftest import RedisServer, rabbitmqctl, require_server

from .conftest import Project, WorkerProcess

pytestmark = pytest.mark.slow

AQUEUE_DIR = str(Path(aqueue.__file__).parent)

FLEET_TASKS = '''

import os


@app.task
async def record(n):
    """Appends ``n`` to this worker's own file, so that runs can be counted per worker."""
    with open(f"runs-{os.getpid()}.txt", "a") as f:
        f.write(f"{n}\\n")
    return n


@app.task
async def slow(seconds, mark):
    """Sleeps, appending 'start <pid>' and 'done <pid>' lines to ``mark``."""
    with open(mark, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    await asyncio.sleep(seconds)
    with open(mark, "a") as f:
        f.write(f"done {os.getpid()}\\n")
    return seconds
'''


def write_tasks(project: Project, **settings: Any) -> None:
    project.write_tasks(FLEET_TASKS, **settings)


async def send_all(
    client: App, name: str, args: Sequence[Sequence[Any]], batch: int = 500
) -> list[AsyncResult[Any]]:
    """Send one task per item of ``args``, ``batch`` at a time, each batch confirmed before the next."""
    sent: list[AsyncResult[Any]] = []
    for start in range(0, len(args), batch):
        chunk = [client.send_task(name, list(a)) for a in args[start : start + batch]]
        with anyio.fail_after(30):
            await asyncio.gather(*chunk)
        sent += chunk
    return sent


async def collect(results: Sequence[AsyncResult[Any]], timeout: float) -> list[Any]:
    """Every result's value; fails once ``timeout`` has passed for them all."""
    with anyio.fail_after(timeout):
        return list(await asyncio.gather(*(r.get(timeout=timeout) for r in results)))


def runs_by_worker(project: Project) -> dict[int, list[int]]:
    """The arguments ``record`` ran with, per worker pid."""
    found: dict[int, list[int]] = {}
    for path in project.root.glob("runs-*.txt"):
        found[int(path.stem.removeprefix("runs-"))] = [int(line) for line in path.read_text().split()]
    return found


async def wait_for_lines(path: Path, count: int, timeout: float = 20.0) -> list[str]:
    """The lines of ``path`` once it has at least ``count`` of them."""
    with anyio.fail_after(timeout):
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= count:
                return lines
            await anyio.sleep(0.05)


async def ping_until_answered(project: Project, timeout: float) -> str:
    """``inspect ping`` until some worker answers; its output."""
    deadline = time.monotonic() + timeout
    while True:
        ping = await project.cli("inspect", "ping", "--timeout", "1")
        if ping.returncode == 0:
            return ping.stdout
        if time.monotonic() > deadline:
            pytest.fail(f"no worker answered inspect ping within {timeout}s: {ping.output}")


def worker_with_pid(workers: Sequence[WorkerProcess], pid: int) -> WorkerProcess:
    return next(w for w in workers if w.pid == pid)


# Fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_project(tmp_path: Path) -> AsyncIterator[Project]:
    require_server("redis")
    project = Project(tmp_path, "redis")
    try:
        yield project
    finally:
        await project.aclose()


@pytest.fixture
async def vhost_project(tmp_path: Path, vhost: str) -> AsyncIterator[Project]:
    """An AMQP project on a vhost of its own (results in Redis)."""
    require_server("redis")
    project = Project(tmp_path, "amqp", vhost=vhost)
    try:
        yield project
    finally:
        await project.aclose()


@pytest.fixture
async def private_project(tmp_path: Path, private_redis: RedisServer) -> AsyncIterator[Project]:
    """A Redis project whose broker and results live on the private server."""
    project = Project(tmp_path, "redis", redis_url=private_redis.url)
    try:
        yield project
    finally:
        await project.aclose()


# Crowds ---------------------------------------------------------------------------------------------


async def test_two_workers_on_one_queue_run_each_task_once(fleet_project: Project) -> None:
    # Given: two workers consuming the same queue
    write_tasks(fleet_project)
    workers = [await fleet_project.start_worker("-c", "10", "-n", f"w{i}@fleet") for i in (1, 2)]

    # When: one client sends 2,000 tasks
    async with fleet_project.app() as client:
        sent = await send_all(client, "tasks.record", [[n] for n in range(2000)], batch=200)

        # Then: every result comes back
        assert await collect(sent, timeout=40) == list(range(2000))

    # And: each task ran exactly once, on one of the two workers, and both took a share
    runs = runs_by_worker(fleet_project)
    assert set(runs) <= {w.pid for w in workers}
    every_run = [n for numbers in runs.values() for n in numbers]
    assert sorted(every_run) == list(range(2000)), [n for n, c in Counter(every_run).items() if c > 1][:10]
    assert len(runs) == 2, {pid: len(numbers) for pid, numbers in runs.items()}


async def test_ten_thousand_tasks_none_lost_none_duplicated(fleet_project: Project) -> None:
    # Given: one worker running 200 tasks at once
    write_tasks(fleet_project)
    worker = await fleet_project.start_worker("-c", "200")
    started = time.monotonic()

    # When: one client sends 10,000 tasks
    async with fleet_project.app() as client:
        sent = await send_all(client, "tasks.record", [[n] for n in range(10_000)], batch=1000)

        # Then: every result is its argument
        assert await collect(sent, timeout=60) == list(range(10_000))

    # And: each ran once
    assert list(runs_by_worker(fleet_project)) == [worker.pid]
    runs = runs_by_worker(fleet_project)[worker.pid]
    assert len(runs) == 10_000 and sorted(runs) == list(range(10_000))
    assert time.monotonic() - started < 60


# Crashes --------------------------------------------------------------------------------------------


async def test_sigkill_mid_task_is_run_by_the_other_worker(fleet_project: Project) -> None:
    # Given: acks_late (on Redis a claim lapses after 2 s; RabbitMQ redelivers when the connection
    # drops), two workers, and a 2 s task running on one of them
    await sigkill_mid_task_is_run_by_the_other_worker(
        fleet_project, task_acks_late=True, broker_transport_options={"visibility_timeout": 2}
    )


async def sigkill_mid_task_is_run_by_the_other_worker(project: Project, **settings: Any) -> None:
    """With ``settings``, two workers, a 2 s task running on one of them: killed, the other runs it."""
    write_tasks(project, **settings)
    workers = [await project.start_worker("-c", "1", "-n", f"w{i}@fleet") for i in (1, 2)]
    mark = project.root / "runs.txt"
    async with project.app() as client:
        result = await client.send_task("tasks.slow", [2, str(mark)])
        (first,) = await wait_for_lines(mark, 1)
        victim = worker_with_pid(workers, int(first.split()[1]))
        survivor = next(w for w in workers if w is not victim)

        # When: that worker is killed outright
        assert await victim.stop(signal.SIGKILL) == -signal.SIGKILL

        # Then: the other worker runs the task again and its result is stored
        assert await result.get(timeout=25) == 2
    assert mark.read_text().splitlines() == [
        f"start {victim.pid}",
        f"start {survivor.pid}",
        f"done {survivor.pid}",
    ]


async def test_task_three_times_longer_than_the_visibility_timeout_runs_once(redis_project: Project) -> None:
    # Given: a 1 s visibility timeout, acks_late, and two live workers
    write_tasks(redis_project, task_acks_late=True, broker_transport_options={"visibility_timeout": 1})
    workers = [await redis_project.start_worker("-c", "1", "-n", f"w{i}@fleet") for i in (1, 2)]
    mark = redis_project.root / "runs.txt"

    # When: a task runs for 3 s
    async with redis_project.app() as client:
        assert await client.send_task("tasks.slow", [3, str(mark)]).get(timeout=20) == 3

    # Then: its worker kept its claim: it ran once
    lines = mark.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("start ") and lines[1].startswith("done "), lines
    assert lines[0].split()[1] == lines[1].split()[1]
    assert all(w.proc.poll() is None for w in workers)


async def test_garbage_is_dead_lettered_and_the_worker_goes_on(fleet_project: Project) -> None:
    # Given: a running worker
    write_tasks(fleet_project)
    worker = await fleet_project.start_worker()
    queue, garbage_id = fleet_project.default_queue, str(uuid.uuid4())
    async with fleet_project.app() as client:
        # When: bytes that are not JSON arrive, labelled as JSON
        await client.broker.publish([Envelope(garbage_id, queue, b"\x00\xff not json {", "application/json")])

        # Then: the worker logs it by id and dead-letters it
        await worker.wait_for(garbage_id)
        with anyio.fail_after(10):
            while not (dead := await client.broker.dead_letters(queue)):
                await anyio.sleep(0.05)
        assert [(e.id, e.body) for e in dead] == [(garbage_id, b"\x00\xff not json {")]

        # And: it goes on running tasks
        assert await client.send_task("tasks.add", [4, 4]).get(timeout=20) == 8
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log


# Restarts -------------------------------------------------------------------------------------------


async def test_worker_survives_a_redis_restart(private_redis: RedisServer, private_project: Project) -> None:
    # Given: a worker (acks_late) and a client on a private Redis, with tasks done before the restart
    write_tasks(private_project, task_acks_late=True)
    worker = await private_project.start_worker("-c", "10", "-n", "w1@fleet")
    async with private_project.app() as client:
        before = await send_all(client, "tasks.record", [[n] for n in range(20)])
        assert await collect(before, timeout=20) == list(range(20))

        # When: the server stops, stays down while the worker retries, and starts again on its port
        # (empty: it keeps nothing)
        await private_redis.stop()
        await worker.wait_for("reconnecting", timeout=15)
        await anyio.sleep(1.5)
        await private_redis.start()

        # Then: tasks sent afterwards all complete
        after = await send_all(client, "tasks.record", [[n] for n in range(100, 140)])
        assert await collect(after, timeout=30) == list(range(100, 140))

    # And: remote control reaches the worker again, once its subscriber's backoff (at most 1 s) is over
    assert "-> w1@fleet: OK" in await ping_until_answered(private_project, timeout=6)

    # And: it is still running, and logged each lost connection once (not once per retry), then its return
    assert worker.proc.poll() is None
    lost = re.findall(r"the connection of (.+?) was lost", worker.log)
    back = re.findall(r"Redis \S+: (.+) reconnected$", worker.log, re.MULTILINE)
    assert lost and sorted(lost) == sorted(set(lost)), worker.log
    assert sorted(back) == sorted(lost), worker.log
    assert "Traceback" not in worker.log


async def test_worker_and_client_survive_closed_amqp_connections(vhost: str, vhost_project: Project) -> None:
    # Given: a worker (acks_late, 4 at a time) on a vhost of its own, with 20 half-second tasks sent
    # (durable, persistent, confirmed) and some of them running
    write_tasks(vhost_project, task_acks_late=True)
    worker = await vhost_project.start_worker("-c", "4")
    mark = vhost_project.root / "runs.txt"
    async with vhost_project.app() as client:
        before = await send_all(client, "tasks.slow", [[0.5, str(mark)] for _ in range(20)])
        await wait_for_lines(mark, 4)

        # When: RabbitMQ closes every connection of the vhost: the worker's and the client's
        await rabbitmqctl("close_all_connections", "-p", vhost, "test")

        # Then: the client publishes again once reconnected, and every task, before and after, completes
        after = await send_all(client, "tasks.slow", [[0.1, str(mark)] for _ in range(20)])
        assert await collect(before + after, timeout=40) == [0.5] * 20 + [0.1] * 20

    # And: the worker is still running, and no error came from its own code (aiormq logs the forced
    # close with a traceback of its reader task)
    assert worker.proc.poll() is None
    frames = [line for line in worker.log.splitlines() if line.strip().startswith('File "')]
    assert not [frame for frame in frames if AQUEUE_DIR in frame], worker.log
    done = [line for line in mark.read_text().splitlines() if line.startswith("done")]
    assert len(done) >= 40


async def test_tasks_prefetched_before_closed_amqp_connections_run_once(
    vhost: str, vhost_project: Project
) -> None:
    # Given: early acks, a worker running one task at a time: one 2 s task running (acknowledged when it
    # started) and three short ones prefetched behind it, unacknowledged; no results stored, so a copy
    # delivered again cannot be recognised as finished
    write_tasks(vhost_project)
    await vhost_project.start_worker("-c", "1")
    mark = vhost_project.root / "runs.txt"
    async with vhost_project.app() as client:
        seconds = [2.0, 0.2, 0.2, 0.2]
        sent = [client.send_task("tasks.slow", [s, str(mark)], ignore_result=True) for s in seconds]
        with anyio.fail_after(10):
            await asyncio.gather(*sent)
    await wait_for_lines(mark, 1)

    # When: RabbitMQ closes the worker's connection while the first task runs
    await rabbitmqctl("close_all_connections", "-p", vhost, "test")

    # Then: the first task is not run again, and the three prefetched ones run once each, after it
    with anyio.fail_after(20):
        while sum(line.startswith("done") for line in await wait_for_lines(mark, 1)) < 4:
            await anyio.sleep(0.05)
    await anyio.sleep(2)  # room for copies delivered again to show up
    starts = [line for line in mark.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 4, mark.read_text()
