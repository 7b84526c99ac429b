"""Workflows across real worker processes: a chord whose header tasks are redelivered after a SIGKILL.

Each run of a header task leaves a file ``part.<index>.<stage>.<pid>`` in a folder, so the test sees which
parts ran twice; the chord's callback appends one line to ``callback.txt`` each time it runs.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from aqueue import chord, signature
from aqueue.result.groupresult import GroupResult

from .conftest import Project, open_project
from .test_processes import until

PARTS = '''

import os


@app.task
async def part(index, hold, folder):
    """Returns ``index``, leaving a start and a done file; with ``hold``, waits while folder/hold exists."""
    Path(folder, f"part.{index}.start.{os.getpid()}").touch()
    for _ in range(1200 if hold else 0):
        if not Path(folder, "hold").exists():
            break
        await asyncio.sleep(0.05)
    Path(folder, f"part.{index}.done.{os.getpid()}").touch()
    return index


@app.task
def total(indexes, folder):
    """The chord's callback: appends the sum to callback.txt, once per run."""
    with open(Path(folder, "callback.txt"), "a") as f:
        f.write(f"{sum(indexes)}\\n")
    return sum(indexes)
'''

DIE_AFTER_JOIN = '''

import signal

from aqueue.result.base import ResultBackend

_chord_join = ResultBackend.chord_join


async def _join_then_die(self, group_id, index, size, meta):
    """Once: the process dies right after the report that completes a chord, before anything else."""
    join = await _chord_join(self, group_id, index, size, meta)
    marker = Path({folder!r}, "die-after-join")
    if join.first and marker.exists():
        marker.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return join


ResultBackend.chord_join = _join_then_die
'''
"""Kills the worker at one exact point: the chord is complete, its callback not sent, the task not acked."""

FAST, HELD = 4, 4
"""Header tasks that finish before the kill, and header tasks running when it comes."""


@pytest.fixture(params=["sqlite", "redis", "amqp"])
async def any_project(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Project]:
    """A project on SQLite, on Redis, and on RabbitMQ with its results in Redis."""
    async with open_project(tmp_path, request.param) as project:
        yield project


def runs(folder: Path, stage: str) -> dict[int, int]:
    """For each header index, how many of its runs reached ``stage`` (``start`` or ``done``)."""
    counts: dict[int, int] = {}
    for path in folder.glob(f"part.*.{stage}.*"):
        index = int(path.name.split(".")[1])
        counts[index] = counts.get(index, 0) + 1
    return counts


async def test_a_chord_whose_header_tasks_are_redelivered_calls_back_once(
    any_project: Project, tmp_path: Path
) -> None:
    project, folder, size = any_project, tmp_path / "runs", FAST + HELD
    folder.mkdir()
    (folder / "hold").touch()
    project.write_tasks(PARTS, task_acks_late=True, broker_transport_options={"visibility_timeout": 1})
    first = await project.start_worker("-n", "first@test", "-c", str(size))
    async with project.app() as client:
        # Given a chord whose header tasks are acknowledged late, on one worker
        header = [signature("tasks.part", (i, i >= FAST, str(folder)), app=client) for i in range(size)]
        result = chord(header)(signature("tasks.total", (), {"folder": str(folder)}, app=client))
        await result

        # When the worker is killed once some header tasks are done (their results stored) and the
        # others are running
        assert isinstance(result.parent, GroupResult)
        for part in result.parent.results[:FAST]:
            await part.get(timeout=20)
        await until(lambda: len(runs(folder, "start")) == size)
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        (folder / "hold").unlink()

        # Then a second worker runs the cut-short ones again, and the callback runs once
        await project.start_worker("-n", "second@test", "-c", str(size))
        assert await result.get(timeout=30) == sum(range(size))
        await anyio.sleep(0.5)
    assert (folder / "callback.txt").read_text().split() == [str(sum(range(size)))]
    # (a copy of a finished one that comes again is acknowledged, not run)
    assert runs(folder, "start") == {i: 1 if i < FAST else 2 for i in range(size)}
    assert runs(folder, "done") == {i: 1 for i in range(size)}


async def test_a_header_task_that_completed_the_chord_and_died_sends_the_callback_once_again(
    any_project: Project, tmp_path: Path
) -> None:
    project, folder, size = any_project, tmp_path / "runs", 6
    folder.mkdir()
    (folder / "die-after-join").touch()
    extra = PARTS + DIE_AFTER_JOIN.format(folder=str(folder))
    project.write_tasks(extra, task_acks_late=True, broker_transport_options={"visibility_timeout": 1})
    first = await project.start_worker("-n", "first@test", "-c", str(size))
    async with project.app() as client:
        # Given a chord whose last header task dies after completing the join: before the callback is
        # sent and before its own message is acknowledged
        header = [signature("tasks.part", (i, False, str(folder)), app=client) for i in range(size)]
        result = chord(header)(signature("tasks.total", (), {"folder": str(folder)}, app=client))
        await result
        assert await first.wait(timeout=20) == -signal.SIGKILL
        assert not (folder / "callback.txt").exists()

        # When a second worker receives that task again
        second = await project.start_worker("-n", "second@test", "-c", str(size))

        # Then it does not run it again, and it sends the callback, which runs once
        assert await result.get(timeout=30) == sum(range(size))
        await second.wait_for("already finished: redelivered copy acknowledged")
        await anyio.sleep(0.5)
    assert (folder / "callback.txt").read_text().split() == [str(sum(range(size)))]
    assert runs(folder, "done") == {i: 1 for i in range(size)}
