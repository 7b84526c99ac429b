"""``worker --processes N`` with real worker processes: pids, control names, kills, recycling, shutdown.

Every run of the ``where`` task leaves a file ``<tag>.start.<pid>`` when it starts and ``<tag>.done.<pid>``
when it ends, so the tests count executions (lost ones and duplicates) and see which process ran them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from aqueue.events import EventReceiver

from .conftest import Project, WorkerProcess, open_project

pytestmark = pytest.mark.slow

WHERE = '''

import os


@app.task
async def where(tag, seconds, folder):
    """Returns the pid that ran it; leaves a start and a done file in ``folder``."""
    Path(folder, f"{tag}.start.{os.getpid()}").touch()
    await asyncio.sleep(seconds)
    Path(folder, f"{tag}.done.{os.getpid()}").touch()
    return os.getpid()
'''


@pytest.fixture(params=["sqlite", "redis", "amqp"])
async def any_project(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Project]:
    """A project on SQLite, on Redis, and on RabbitMQ with its results in Redis."""
    async with open_project(tmp_path, request.param) as project:
        yield project


def runs(folder: Path, stage: str) -> dict[str, list[int]]:
    """For each tag, the pids of the runs that reached ``stage`` (``start`` or ``done``)."""
    found: dict[str, list[int]] = {}
    for path in folder.iterdir():
        tag, seen, pid = path.name.split(".")
        if seen == stage:
            found.setdefault(tag, []).append(int(pid))
    return found


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.05)


async def start_processes(project: Project, *args: str) -> WorkerProcess:
    """Start ``worker --processes ...`` named w1@test and wait until all its processes are ready."""
    parent = project.spawn_worker("-n", "w1@test", *args)
    await parent.wait_for("processes ready.", timeout=40)
    return parent


def children_of(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def test_help_says_what_c_and_processes_mean() -> None:
    import subprocess

    from .conftest import subprocess_env

    done = subprocess.run(
        [sys.executable, "-m", "aqueue", "worker", "--help"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for flag in ("--processes N", "--max-tasks-per-child N", "--max-memory-per-child KIB"):
        assert flag in text
    assert "Not a process count as on Celery's prefork pool: that is --processes." in text
    assert "--supervised-child" not in text


async def test_tasks_run_in_two_processes_and_sigterm_drains_both(project: Project, folder: Path) -> None:
    # Given: two processes of one slot each, holding one message each (acks_late: until it is done)
    project.write_tasks(WHERE, task_acks_late=True)
    parent = await start_processes(
        project, "--processes", "2", "-c", "1", "--prefetch-multiplier", "1", "--pidfile", "w.pid"
    )
    assert (project.root / "w.pid").read_text().strip() == str(parent.pid)
    assert "2 processes x 1 (asyncio)" in parent.output
    children = children_of(parent.pid)
    assert len(children) == 2

    async with project.app() as client:
        # When: six tasks are sent
        results = [await client.send_task("tasks.where", [i, 0.3, str(folder)]) for i in range(6)]

        # Then: both processes ran some
        pids = {await r.get(timeout=30) for r in results}
        assert pids == children

        # And: each answers remote control by its own name, also when addressed by the worker's name
        ping = await project.cli("inspect", "ping")
        assert "-> w1-1@test: OK" in ping.stdout and "-> w1-2@test: OK" in ping.stdout, ping.output
        assert "2 nodes online." in ping.stdout
        addressed = await project.cli("inspect", "ping", "-d", "w1@test")
        assert addressed.returncode == 0 and "-> w1-" in addressed.stdout, addressed.output

        # When: each process is running a 2 s task and the parent gets SIGTERM
        long = [await client.send_task("tasks.where", [f"long{i}", 2, str(folder)]) for i in range(2)]
        await until(lambda: sum(name.startswith("long") for name in os.listdir(folder)) == 2)
        assert set(runs(folder, "start")["long0"] + runs(folder, "start")["long1"]) == children

        # Then: both finish their task, and the parent exits 0 once both have stopped
        code = await parent.stop(signal.SIGTERM, timeout=30)
        assert code == 0, parent.log
        assert {await r.get(timeout=5) for r in long} == children
    assert parent.log.count("SIGTERM received: warm shutdown") == 3
    assert not (project.root / "w.pid").exists()
    assert not any(alive(pid) for pid in children)


async def test_a_killed_child_is_replaced_and_its_acks_late_task_runs_again(
    any_project: Project, folder: Path
) -> None:
    # Given: acks_late, a 1 s visibility timeout, and two processes of one slot each
    project = any_project
    project.write_tasks(WHERE, task_acks_late=True, broker_transport_options={"visibility_timeout": 1})
    parent = await start_processes(project, "--processes", "2", "-c", "1", "--prefetch-multiplier", "1")
    async with project.app() as client:
        result = await client.send_task("tasks.where", ["t", 2, str(folder)])
        await until(lambda: "t" in runs(folder, "start"))
        [victim] = runs(folder, "start")["t"]

        # When: the process running it is killed outright
        os.kill(victim, signal.SIGKILL)

        # Then: the parent logs how it died and starts a replacement
        await parent.wait_for(f"pid:{victim} exited with 'signal 9 (SIGKILL)'; starting a new one")
        await until(lambda: parent.log.count(" ready.") >= 3)

        # And: the task runs again in another process, to the end, once
        survivor = await result.get(timeout=40)
    assert survivor != victim
    assert sorted(runs(folder, "start")["t"]) == sorted([victim, survivor])
    assert runs(folder, "done") == {"t": [survivor]}
    assert len(children_of(parent.pid)) == 2
    code = await parent.stop(signal.SIGTERM, timeout=30)
    assert code == 0, parent.log


async def test_task_events_are_sent_by_every_process_with_e(project: Project, folder: Path) -> None:
    # Given: two processes of one slot each, started with -E
    project.write_tasks(WHERE)
    parent = await start_processes(project, "--processes", "2", "-c", "1", "--prefetch-multiplier", "1", "-E")
    async with project.app() as client, EventReceiver(client.broker).events() as stream:
        # When: tasks run in both
        results = [await client.send_task("tasks.where", [i, 0.3, str(folder)]) for i in range(6)]
        assert {await r.get(timeout=30) for r in results} == children_of(parent.pid)

        # Then: each process sends task events under its own name
        senders: set[str] = set()
        with anyio.fail_after(20):
            async for event in stream:
                if event["type"] == "task-succeeded":
                    senders.add(event["hostname"])
                if senders == {"w1-1@test", "w1-2@test"}:
                    break
    assert await parent.stop(signal.SIGTERM, timeout=30) == 0, parent.log


async def test_recycling_by_task_count_loses_no_task(project: Project, folder: Path) -> None:
    # Given: two processes that are replaced after four tasks each (messages acknowledged early)
    project.write_tasks(WHERE)
    parent = await start_processes(project, "--processes", "2", "-c", "2", "--max-tasks-per-child", "4")
    async with project.app() as client:
        # When: 24 tasks are sent
        results = [await client.send_task("tasks.where", [i, 0.05, str(folder)]) for i in range(24)]
        pids = [await r.get(timeout=90) for r in results]

    # Then: each ran exactly once, no process ran more than four, and at least six processes took part
    assert {tag: len(pids) for tag, pids in runs(folder, "done").items()} == {str(i): 1 for i in range(24)}
    assert {tag: len(pids) for tag, pids in runs(folder, "start").items()} == {str(i): 1 for i in range(24)}
    assert max(pids.count(pid) for pid in pids) <= 4
    assert len(set(pids)) >= 6
    assert "took its 4 tasks (max tasks per child)" in parent.log
    assert "(recycled)" in parent.log
    code = await parent.stop(signal.SIGTERM, timeout=30)
    assert code == 0, parent.log


async def test_max_memory_per_child_alone_runs_one_recycled_process(
    sqlite_project: Project, folder: Path
) -> None:
    # Given: a memory limit every process is over, and no --processes
    sqlite_project.write_tasks(WHERE)
    parent = await start_processes(sqlite_project, "--max-memory-per-child", "1")
    assert "1 process x 100 (asyncio)" in parent.output
    await parent.wait_for("over the max memory per child (1 KiB): it is replaced after every task")

    async with sqlite_project.app() as client:
        # When: a task has run
        first = await (await client.send_task("tasks.where", [1, 0, str(folder)])).get(timeout=30)

        # Then: its process is replaced, and the next task runs in the new one
        await parent.wait_for("is being recycled; starting its replacement")
        second = await (await client.send_task("tasks.where", [2, 0, str(folder)])).get(timeout=30)
    assert first != second
    assert "is over the max memory per child (1 KiB)" in parent.log
    code = await parent.stop(signal.SIGTERM, timeout=30)
    assert code == 0, parent.log


async def test_a_second_sigint_kills_every_process_at_once(sqlite_project: Project, folder: Path) -> None:
    # Given: two processes (by the setting), one running a long task
    sqlite_project.write_tasks(WHERE, worker_processes=2)
    parent = await start_processes(sqlite_project)
    children = children_of(parent.pid)
    async with sqlite_project.app() as client:
        await client.send_task("tasks.where", ["t", 60, str(folder)])
        await until(lambda: "t" in runs(folder, "start"))

    # When: SIGINT twice
    parent.send_signal(signal.SIGINT)
    await parent.wait_for("Waiting up to")
    parent.send_signal(signal.SIGINT)

    # Then: the parent exits 1 at once, and its processes are gone
    assert await parent.wait(timeout=10) == 1
    await until(lambda: not any(alive(pid) for pid in children), timeout=10)
    assert "cold shutdown" in parent.log


async def test_processes_stop_when_their_parent_is_killed(sqlite_project: Project) -> None:
    parent = await start_processes(sqlite_project, "--processes", "2", "--shutdown-timeout", "1")
    children = children_of(parent.pid)
    assert len(children) == 2

    assert await parent.stop(signal.SIGKILL) == -signal.SIGKILL

    await until(lambda: not any(alive(pid) for pid in children), timeout=20)
    assert parent.log.count("the parent process is gone: warm shutdown") == 2
