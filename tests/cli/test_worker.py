"""``python -m aqueue worker``: help, app loading, banner, queues, pidfile, logfile, statedb."""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from aqueue import states
from aqueue.app import App
from aqueue.worker.banner import banner

from .conftest import Project, subprocess_env

pytestmark = pytest.mark.slow

WORKER_FLAGS = [
    "-A, --app",
    "-l, --loglevel",
    "-c, --concurrency",
    "-Q, --queues",
    "-n, --hostname",
    "--pidfile",
    "--logfile",
    "--statedb",
]


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=30, check=False
    )


def test_help_lists_the_commands() -> None:
    # When: python -m aqueue --help
    done = run([sys.executable, "-m", "aqueue", "--help"])

    # Then: every command and -A are documented
    assert done.returncode == 0, done.stderr
    for word in ("-A, --app", "worker", "control", "inspect", "call", "result", "purge"):
        assert word in done.stdout


def test_worker_help_documents_every_flag() -> None:
    done = run([sys.executable, "-m", "aqueue", "worker", "--help"])

    assert done.returncode == 0, done.stderr
    for flag in WORKER_FLAGS:
        assert flag in done.stdout, f"{flag} missing from worker --help"
    assert "--shutdown-timeout" in done.stdout


def test_console_script_exists(sqlite_project: Project) -> None:
    # Given: the `aqueue` script installed next to this Python
    script = Path(sys.executable).with_name("aqueue")
    found = str(script) if script.exists() else shutil.which("aqueue")
    assert found, "the aqueue console script is not installed"

    # When / Then: it runs the same command line
    done = run([found, "worker", "--help"])
    assert done.returncode == 0, done.stderr
    assert "--loglevel" in done.stdout

    # And: it finds tasks.py in the working directory (no worker runs, so nobody replies)
    ping = run([found, "-A", "tasks", "inspect", "ping", "--timeout", "0.2"], cwd=sqlite_project.root)
    assert ping.returncode == 1, ping.stderr
    assert "No nodes replied" in ping.stderr


def test_worker_without_app_says_how_to_give_it(tmp_path: Path) -> None:
    done = run([sys.executable, "-m", "aqueue", "worker"], cwd=tmp_path)

    assert done.returncode == 2
    assert "-A" in done.stderr


def test_unknown_app_module_is_a_usage_error(tmp_path: Path) -> None:
    done = run([sys.executable, "-m", "aqueue", "-A", "nosuchmodule", "worker"], cwd=tmp_path)

    assert done.returncode == 2
    assert "nosuchmodule" in done.stderr


def test_app_attribute_that_is_not_an_app_is_a_usage_error(sqlite_project: Project) -> None:
    done = run([sys.executable, "-m", "aqueue", "-A", "tasks:add", "worker"], cwd=sqlite_project.root)

    assert done.returncode == 2
    assert "'tasks:add' is not an App" in done.stderr


def test_banner_masks_passwords_and_lists_the_setup() -> None:
    # Given: an app whose broker and backend URLs carry passwords (no connection is made)
    app = App("proj", broker="redis://user:s3cret@127.0.0.1:6379/0", backend="redis://:t0psecret@127.0.0.1/1")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    # When
    text = banner(app, hostname="w1@test", concurrency=7, queues=["celery", "low-priority"])

    # Then: names, masked URLs, concurrency, queues and tasks are shown; the passwords are not
    assert "s3cret" not in text and "t0psecret" not in text
    assert "redis://user:**@127.0.0.1:6379/0" in text
    assert "redis://:**@127.0.0.1/1" in text
    assert "w1@test" in text
    assert "proj" in text
    assert "concurrency: 7" in text
    assert ".> celery " in text and ".> low-priority " in text
    assert f"  . {add.name}" in text


def test_banner_shows_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: broker and result backend given only by AQUEUE_* variables, with passwords
    monkeypatch.setenv("AQUEUE_BROKER_URL", "redis://:brokerpw@127.0.0.1:6379/2")
    monkeypatch.setenv("AQUEUE_RESULT_BACKEND", "redis://:resultpw@127.0.0.1:6379/3")
    app = App("proj")

    # When
    text = banner(app, hostname="w1@test", concurrency=1, queues=["celery"])

    # Then: both are shown, masked
    assert ".> transport:   redis://:**@127.0.0.1:6379/2" in text
    assert ".> results:     redis://:**@127.0.0.1:6379/3" in text
    assert "brokerpw" not in text and "resultpw" not in text


async def test_worker_prints_banner_and_serves(project: Project, client: App) -> None:
    # Given: a worker started with -c, -Q and -n
    queue = f"{project.default_queue},extra"
    worker = await project.start_worker("-c", "3", "-Q", queue, "-n", "w1@test")

    # Then: its banner names the app, transport, concurrency, queues and tasks
    out = worker.output
    assert "w1@test" in out
    assert "app:         tasks" in out
    assert "concurrency: 3" in out
    assert f".> {project.default_queue} " in out and ".> extra " in out
    for name in ("tasks.add", "tasks.fail", "tasks.sleep"):
        assert f"  . {name}" in out

    # And: it runs tasks from both queues
    assert await client.send_task("tasks.add", [1, 2]).get(timeout=20) == 3
    assert await client.send_task("tasks.add", [2, 2], queue="extra").get(timeout=20) == 4
    assert await worker.stop() == 0


async def test_app_option_after_the_command(sqlite_project: Project, sqlite_client: App) -> None:
    # When: `worker -A tasks` instead of `-A tasks worker`
    argv = [sys.executable, "-m", "aqueue", "worker", "-A", "tasks", "-l", "info"]
    worker = await sqlite_project.start_worker(argv=argv)

    # Then: it is the same worker
    assert await sqlite_client.send_task("tasks.add", [20, 22]).get(timeout=20) == 42
    assert await worker.stop() == 0


async def test_routed_task_waits_for_a_worker_on_its_queue(project: Project) -> None:
    # Given: tasks.add routed to low-priority, and a task sent before any worker runs
    project.write_tasks(task_routes={"tasks.add": "low-priority"})
    async with project.app() as client:
        result = await client.send_task("tasks.add", [2, 3])

        # When: a worker on the default queue only runs for a while
        default = await project.start_worker("-n", "default@test")
        await asyncio.sleep(1.0)

        # Then: it does not take the routed task
        assert (await client.backend.get(result.id)).status == states.PENDING
        assert result.id not in default.log

        # When: a worker consuming low-priority starts
        low = await project.start_worker("-Q", "low-priority", "-n", "low@test")

        # Then: it runs the waiting task
        assert await result.get(timeout=20) == 5
        await low.wait_for(f"Task tasks.add[{result.id}] received")
        assert result.id not in default.log
        assert await low.stop() == 0
        assert await default.stop() == 0


async def test_pidfile_is_exclusive_and_removed_on_exit(sqlite_project: Project) -> None:
    pidfile = sqlite_project.root / "w.pid"

    # Given: a worker holding w.pid
    first = await sqlite_project.start_worker("--pidfile", "w.pid")
    assert pidfile.read_text().strip() == str(first.pid)

    # When: a second worker starts with the same pidfile
    second = sqlite_project.spawn_worker("--pidfile", "w.pid", "-n", "second@test")
    code = await second.wait(timeout=20)

    # Then: it refuses, says why, and leaves the file alone
    assert code != 0
    assert "w.pid" in second.output and str(first.pid) in second.output
    assert "ready" not in second.output
    assert pidfile.read_text().strip() == str(first.pid)

    # When: the first worker stops, its pidfile goes with it
    assert await first.stop() == 0
    assert not pidfile.exists()


def _claim_pidfile(path: str, start: Any, outcomes: Any, release: Any) -> None:
    """In a child process: take the pidfile at the same instant as the others; report; hold it until told."""
    import click

    from aqueue.cli.worker import _pidfile

    start.wait(10)
    try:
        with _pidfile(path):
            outcomes.put("took it")
            release.wait(10)
    except click.ClickException as exc:
        outcomes.put(exc.message)


def test_workers_started_at_the_same_instant_cannot_both_take_the_pidfile(tmp_path: Path) -> None:
    # Given: eight processes that try to take one pidfile at the same instant, each keeping it if it got it
    context = multiprocessing.get_context("spawn")
    start, release, outcomes = context.Barrier(8), context.Event(), context.Queue()
    path = str(tmp_path / "w.pid")
    children = [
        context.Process(target=_claim_pidfile, args=(path, start, outcomes, release)) for _ in range(8)
    ]
    for child in children:
        child.start()
    try:
        said = [outcomes.get(timeout=30) for _ in children]
    finally:
        release.set()
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
    # Then: exactly one took it, and the seven others were told a running worker holds it
    assert said.count("took it") == 1, said
    assert all("that is still running" in text for text in said if text != "took it"), said
    assert not (tmp_path / "w.pid").exists()


async def test_stale_pidfile_is_replaced(sqlite_project: Project) -> None:
    # Given: a pidfile left behind by a process that is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    pidfile = sqlite_project.root / "w.pid"
    pidfile.write_text(f"{gone.pid}\n")

    # When / Then: a worker starts anyway and writes its own pid
    worker = await sqlite_project.start_worker("--pidfile", "w.pid")
    assert pidfile.read_text().strip() == str(worker.pid)
    assert await worker.stop() == 0
    assert not pidfile.exists()


async def test_logfile_receives_the_log(sqlite_project: Project, sqlite_client: App) -> None:
    # Given: a worker logging to w.log
    worker = await sqlite_project.start_worker("--logfile", "w.log", logfile="w.log")

    # When: it runs a task
    result = await sqlite_client.send_task("tasks.add", [4, 4])
    assert await result.get(timeout=20) == 8

    # Then: the task's log lines are in the file, not on stderr (which keeps the banner)
    log = await worker.wait_for(f"Task tasks.add[{result.id}] succeeded in ")
    assert " ready." in log
    assert result.id not in worker.output
    assert "[tasks]" in worker.output
    assert await worker.stop() == 0


async def test_statedb_keeps_revoked_ids_across_restarts(sqlite_project: Project) -> None:
    task_id = str(uuid.uuid4())

    # Given: a worker with a state file, and a task id revoked through it
    worker = await sqlite_project.start_worker("--statedb", "state.db", "-n", "w1@test")
    revoked = await sqlite_project.cli("control", "revoke", task_id)
    assert revoked.returncode == 0, revoked.output
    assert "-> w1@test: OK" in revoked.stdout
    assert await worker.stop() == 0

    # When: the worker restarts with the same state file and a task arrives with that id
    again = await sqlite_project.start_worker("--statedb", "state.db", "-n", "w1@test")
    async with sqlite_project.app() as client:
        result = await client.send_task("tasks.add", [1, 1], task_id=task_id)
        after = await client.send_task("tasks.add", [2, 2])

        # Then: the revoked task is discarded, not run; the next one runs
        assert await after.get(timeout=20) == 4
        await again.wait_for(f"Discarding revoked task tasks.add[{task_id}]")
        await result.refresh()
        assert result.state == states.REVOKED
    assert f"Task tasks.add[{task_id}] succeeded" not in again.log
    assert await again.stop() == 0


async def test_sigint_stops_the_worker(sqlite_project: Project) -> None:
    worker = await sqlite_project.start_worker()

    assert await worker.stop(signal.SIGINT) == 0
    assert "SIGINT received" in worker.log


async def test_second_sigint_stops_at_once(sqlite_project: Project, sqlite_client: App) -> None:
    # Given: a worker running a long task, already in warm shutdown after one SIGINT
    worker = await sqlite_project.start_worker()
    result = await sqlite_client.send_task("tasks.sleep", [30])
    await worker.wait_for(f"Task tasks.sleep[{result.id}] received")
    worker.send_signal(signal.SIGINT)
    await worker.wait_for("SIGINT received")

    # When: a second SIGINT comes
    code = await worker.stop(signal.SIGINT, timeout=5)

    # Then: it exits at once, non-zero, saying so
    assert code != 0
    assert "cold shutdown" in worker.log


@pytest.mark.parametrize("option", ["--logfile", "--pidfile"])
def test_unwritable_logfile_or_pidfile_is_a_clean_error(sqlite_project: Project, option: str) -> None:
    done = run(
        [sys.executable, "-m", "aqueue", "-A", "tasks", "worker", option, "nodir/w.out"],
        cwd=sqlite_project.root,
    )

    assert done.returncode == 1
    assert "nodir/w.out" in done.stderr and "No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr
