"""``python -m aqueue control`` and ``inspect`` against live worker subprocesses."""

from __future__ import annotations

import asyncio
import json
import time

import anyio
import pytest

from aqueue.app import App

from .conftest import Project, WorkerProcess

pytestmark = pytest.mark.slow


async def two_workers(project: Project) -> tuple[WorkerProcess, WorkerProcess]:
    first, second = project.spawn_worker("-n", "w1@test"), project.spawn_worker("-n", "w2@test")
    await first.wait_for(" ready.")
    await second.wait_for(" ready.")
    return first, second


async def ready_count(client: App, ids: list[str]) -> int:
    return sum([(await client.backend.get(task_id)).ready for task_id in ids])


async def test_rate_limit_reaches_every_worker_and_applies(project: Project, client: App) -> None:
    # Given: two live workers
    w1, w2 = await two_workers(project)

    # When: the rate limit of tasks.add is set to 10/m
    done = await project.cli("control", "rate_limit", "tasks.add", "10/m")

    # Then: each worker answers by its name, and the command succeeds
    assert done.returncode == 0, done.output
    assert "-> w1@test: OK" in done.stdout and "-> w2@test: OK" in done.stdout
    assert done.stdout.count("new rate limit set successfully") == 2
    await w1.wait_for("New rate limit for tasks of type tasks.add: 10/m.")
    await w2.wait_for("New rate limit for tasks of type tasks.add: 10/m.")

    # And: it is in force: each worker starts one add at once, then waits 6 s for the next
    sent = [await client.send_task("tasks.add", [i, i]) for i in range(4)]
    ids = [r.id for r in sent]
    with anyio.fail_after(10):
        while await ready_count(client, ids) < 1:
            await anyio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert await ready_count(client, ids) <= 2

    # When: the limit is lifted, the waiting tasks run at once
    lifted = await project.cli("control", "rate_limit", "tasks.add", "0")
    assert lifted.returncode == 0, lifted.output
    assert [await r.get(timeout=10) for r in sent] == [0, 2, 4, 6]
    assert await w1.stop() == 0
    assert await w2.stop() == 0


async def test_control_with_no_worker_fails_fast(project: Project) -> None:
    began = time.monotonic()

    done = await project.cli("control", "rate_limit", "tasks.add", "10/m")

    assert done.returncode != 0
    assert "No nodes replied" in done.stderr
    assert time.monotonic() - began < 8


async def test_inspect_ping_registered_active_stats(project: Project, client: App) -> None:
    w1, w2 = await two_workers(project)

    # ping: both answer pong
    ping = await project.cli("inspect", "ping")
    assert ping.returncode == 0, ping.output
    assert "-> w1@test: OK" in ping.stdout and "-> w2@test: OK" in ping.stdout
    assert ping.stdout.count("pong") == 2
    assert "2 nodes online." in ping.stdout

    # registered: the tasks of tasks.py
    registered = await project.cli("inspect", "registered", "-d", "w1@test")
    assert registered.returncode == 0, registered.output
    for name in ("tasks.add", "tasks.fail", "tasks.sleep"):
        assert f"* {name}" in registered.stdout
    assert "w2@test" not in registered.stdout

    # active: a running task is listed with its id
    running = await client.send_task("tasks.sleep", [2])
    received = f"Task tasks.sleep[{running.id}] received"
    with anyio.fail_after(10):
        while received not in w1.log + w2.log:
            await anyio.sleep(0.05)
    active = await project.cli("inspect", "active")
    assert active.returncode == 0, active.output
    assert running.id in active.stdout and "tasks.sleep" in active.stdout
    assert active.stdout.count("- empty -") == 1

    # stats: counters and the pool, as JSON
    assert await running.get(timeout=10) == 2
    stats = await project.cli("inspect", "stats", "-d", "w1@test,w2@test")
    assert stats.returncode == 0, stats.output
    body = stats.stdout.split("-> w1@test: OK", 1)[1].split("->", 1)[0]
    assert set(json.loads(body)) >= {"active", "total", "uptime", "pool"}


async def test_control_errors_are_reported_per_worker(sqlite_project: Project) -> None:
    await sqlite_project.start_worker("-n", "w1@test")

    # An unknown task and a bad rate: the worker says why, the command exits non-zero
    unknown = await sqlite_project.cli("control", "rate_limit", "tasks.nope", "10/m")
    assert unknown.returncode == 1
    assert "-> w1@test: ERROR" in unknown.stdout and "tasks.nope" in unknown.stdout

    bad = await sqlite_project.cli("control", "rate_limit", "tasks.add", "ten a minute")
    assert bad.returncode == 1
    assert "-> w1@test: ERROR" in bad.stdout and "ten a minute" in bad.stdout


async def test_inspect_with_no_worker_fails_fast(sqlite_project: Project) -> None:
    began = time.monotonic()

    done = await sqlite_project.cli("inspect", "ping", "--timeout", "0.5")

    assert done.returncode != 0
    assert "No nodes replied" in done.stderr
    assert time.monotonic() - began < 8
