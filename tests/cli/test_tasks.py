"""``python -m aqueue call``, ``result`` and ``purge`` against a real worker."""

from __future__ import annotations

import re
import time
import uuid

import pytest

from aqueue.app import App

from .conftest import Project

pytestmark = pytest.mark.slow


async def test_call_then_result_prints_the_value(project: Project) -> None:
    # Given: a running worker
    worker = await project.start_worker()

    # When: a task is sent by name from the command line
    sent = await project.cli("call", "tasks.add", "--args", "[4, 4]")
    assert sent.returncode == 0, sent.output
    task_id = sent.stdout.strip()
    uuid.UUID(task_id)

    # Then: `result` prints its value, and the worker logs it as Celery's does
    got = await project.cli("result", task_id, "--timeout", "20")
    assert got.returncode == 0, got.output
    assert got.stdout.strip() == "8"
    await worker.wait_for(f"Task tasks.add[{task_id}] received")
    log = await worker.wait_for(f"Task tasks.add[{task_id}] succeeded in ")
    assert re.search(rf"Task tasks\.add\[{task_id}\] succeeded in \d+\.\d+s: 8\n", log)
    assert await worker.stop() == 0


async def test_failing_task_result_exits_non_zero(project: Project) -> None:
    worker = await project.start_worker()

    # When: a task that raises ValueError('boom') is sent
    sent = await project.cli("call", "tasks.fail", "--kwargs", '{"message": "boom"}')
    assert sent.returncode == 0, sent.output
    task_id = sent.stdout.strip()

    # Then: `result` exits non-zero with the exception's type and message
    got = await project.cli("result", task_id, "--timeout", "20")
    assert got.returncode != 0
    assert "ValueError" in got.stderr and "boom" in got.stderr

    # And: the worker logged the traceback
    log = await worker.wait_for(f"Task tasks.fail[{task_id}] raised unexpected")
    assert "Traceback (most recent call last)" in log
    assert "ValueError: boom" in log
    assert worker.proc.poll() is None
    assert await worker.stop() == 0


async def test_result_times_out_for_a_task_nobody_runs(sqlite_project: Project) -> None:
    began = time.monotonic()

    got = await sqlite_project.cli("result", str(uuid.uuid4()), "--timeout", "0.5")

    assert got.returncode != 0
    assert "TimeoutError" in got.stderr
    assert time.monotonic() - began < 10


async def test_call_rejects_arguments_that_are_not_json(sqlite_project: Project) -> None:
    got = await sqlite_project.cli("call", "tasks.add", "--args", "[4, 4")

    assert got.returncode == 2
    assert "--args" in got.stderr and "not JSON" in got.stderr


async def test_call_with_countdown_runs_later(sqlite_project: Project, sqlite_client: App) -> None:
    worker = await sqlite_project.start_worker()

    # When: a task is sent with --countdown 1
    sent = await sqlite_project.cli("call", "tasks.add", "--args", "[1, 1]", "--countdown", "1")
    task_id = sent.stdout.strip()
    began = time.monotonic()

    # Then: it runs, but not before the countdown
    assert await sqlite_client.AsyncResult(task_id).get(timeout=20) == 2
    assert time.monotonic() - began > 0.3
    assert await worker.stop() == 0


async def test_purge_deletes_waiting_messages(sqlite_project: Project, sqlite_client: App) -> None:
    # Given: three messages waiting and no worker
    for i in range(3):
        await sqlite_client.send_task("tasks.add", [i, i])

    # When
    purged = await sqlite_project.cli("purge", "-f")

    # Then: they are gone
    assert purged.returncode == 0, purged.output
    assert "Purged 3 messages" in purged.stdout
    again = await sqlite_project.cli("purge", "-f")
    assert "Purged 0 messages" in again.stdout
