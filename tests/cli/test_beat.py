"""Beat processes on real brokers: ``beat`` and ``worker -B`` at once, crashes, restarts, downtime.

The entry runs every second; each run appends its task id to ``beat-runs.txt`` (a side effect of the
task, run by a worker). Task ids are derived from the entry and the due time, so the test maps each run
back to the due time it was sent for.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aqueue.beat import Entry
from aqueue.schedules import schedule
from tests.conftest import require_server

from .conftest import Project, WorkerProcess

ENTRY = "every-second"
BEAT_TASKS = '''

@app.task(bind=True, ignore_result=True)
async def record_beat(self):
    """Appends the id of this run to beat-runs.txt, so that runs can be counted."""
    with open("beat-runs.txt", "a") as f:
        f.write(f"{self.request.id}\\n")
'''


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def beat_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """A project whose app sends ``tasks.record_beat`` every second; RabbitMQ gets a vhost of its own."""
    kind: str = request.param
    if kind != "sqlite":
        require_server("redis")
    vhost = request.getfixturevalue("vhost") if kind == "amqp" else None
    project = Project(tmp_path, kind, vhost=vhost)
    project.write_tasks(BEAT_TASKS, beat_schedule={ENTRY: {"task": "tasks.record_beat", "schedule": 1.0}})
    try:
        yield project
    finally:
        project.close()  # on RabbitMQ the vhost fixture deletes the vhost, marks and all


class Runs:
    """The runs recorded in a project, as the due times they were sent for."""

    def __init__(self, project: Project) -> None:
        self.path = project.root / "beat-runs.txt"
        self.entry = Entry(ENTRY, "tasks.record_beat", schedule(1.0))
        self.since = int(time.time()) - 2

    def due_times(self) -> list[int]:
        ids = self.path.read_text().split() if self.path.exists() else []
        known = {self.entry.task_id(float(due)): due for due in range(self.since, int(time.time()) + 2)}
        unknown = [task_id for task_id in ids if task_id not in known]
        assert unknown == [], f"runs of no due time: {unknown}"
        return [known[task_id] for task_id in ids]

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[int]:
        """Wait until at least ``count`` runs are recorded."""
        deadline = time.monotonic() + timeout
        while len(found := self.due_times()) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{len(found)} runs of {count} within {timeout}s: {found}")
            await asyncio.sleep(0.1)
        return found


async def test_beat_is_a_command_and_a_worker_flag(sqlite_project: Project) -> None:
    listed = await sqlite_project.cli("--help")
    assert "beat" in listed.stdout
    beat_help = await sqlite_project.cli("beat", "--help")
    assert beat_help.returncode == 0 and "--max-interval" in beat_help.stdout
    assert "-B, --beat" in (await sqlite_project.cli("worker", "--help")).stdout


async def test_a_bad_schedule_stops_beat_with_its_reason(sqlite_project: Project) -> None:
    sqlite_project.write_tasks("\napp.conf.beat_schedule['broken'] = {'task': 'tasks.add'}\n")
    done = await sqlite_project.cli("beat")
    assert done.returncode != 0
    assert "beat_schedule entry 'broken' needs 'schedule'" in done.stderr


async def start_beat(project: Project) -> WorkerProcess:
    beat = project.spawn_worker(argv=[sys.executable, "-m", "aqueue", "-A", "tasks", "beat", "-l", "info"])
    await beat.wait_for("beat: Starting...")
    return beat


async def drained(runs: Runs) -> list[int]:
    """The runs, once the worker had a moment to run what the stopped beats sent last."""
    await asyncio.sleep(1.0)
    return runs.due_times()


@pytest.mark.slow
async def test_two_beats_send_each_due_time_once_across_a_crash_and_restart(beat_project: Project) -> None:
    project, runs = beat_project, Runs(beat_project)
    # Given a worker with a beat inside (worker -B) and a beat process, sending every second at once
    worker = await project.start_worker("-B")
    await worker.wait_for("beat: Starting...")
    beat = await start_beat(project)
    await runs.wait_for(len(runs.due_times()) + 4)
    # When the beat process is killed and started again while the other goes on
    beat.send_signal(signal.SIGKILL)
    await beat.wait()
    restarted = await start_beat(project)
    await runs.wait_for(len(runs.due_times()) + 4)
    assert await restarted.stop() == 0
    due = await drained(runs)
    assert await worker.stop() == 0
    # Then no due time ran twice, and every one between the first and the last ran (a beat killed
    # between raising a mark and sending may lose that one run, never send it twice)
    assert len(due) == len(set(due)), sorted(due)
    missing = set(range(min(due), max(due) + 1)) - set(due)
    assert len(missing) <= 1, (sorted(due), missing)
    assert "Scheduler: Sending due task every-second (tasks.record_beat)" in worker.log + restarted.log


@pytest.mark.slow
async def test_a_beat_restarted_after_downtime_does_not_replay_missed_runs(sqlite_project: Project) -> None:
    project, runs = sqlite_project, Runs(sqlite_project)
    project.write_tasks(BEAT_TASKS, beat_schedule={ENTRY: {"task": "tasks.record_beat", "schedule": 1.0}})
    # Given a worker, and a single beat that sent a few runs and was killed
    worker = await project.start_worker()
    beat = await start_beat(project)
    before = await runs.wait_for(2)
    beat.send_signal(signal.SIGKILL)
    await beat.wait()
    stopped_at = max(await drained(runs))
    # When it is started again four seconds later
    await asyncio.sleep(4.0)
    restarted = await start_beat(project)
    await runs.wait_for(len(runs.due_times()) + 2)
    assert await restarted.stop() == 0
    due = await drained(runs)
    assert await worker.stop() == 0
    # Then nothing ran twice, and of the runs missed while it was down at most the latest one ran
    assert len(due) == len(set(due)) and len(before) >= 2
    after = sorted(d for d in due if d > stopped_at)
    assert after[0] - stopped_at >= 3, (stopped_at, after)
    assert after == list(range(after[0], after[-1] + 1))
