"""The supervisor of ``worker --processes``, with stand-in children: names, restarts, recycling, stopping.

The children here are small Python scripts that speak the supervisor's protocol (``ready``, ``retiring``
over the socket) instead of aqueue workers; ``tests/cli/test_processes.py`` runs real ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from aqueue.worker import supervisor
from aqueue.worker.supervisor import Supervisor, child_hostname, describe_exit

CHILD = """
import signal, socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
mode = sys.argv[2]
if mode == "fail":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
channel.sendall(b"ready\\n")
if mode == "retire":
    channel.sendall(b"retiring\\n")
    sys.exit(0)
channel.recv(1)  # returns when the parent is gone
"""


def command(modes: Callable[[int], str]) -> Callable[[int, int], list[str]]:
    """Children started by this command behave as ``modes(n)`` says for the n-th child started (from 0)."""
    started = 0

    def argv(index: int, fd: int) -> list[str]:
        nonlocal started
        mode, started = modes(started), started + 1
        return [sys.executable, "-c", CHILD, str(fd), mode]

    return argv


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


def ready_pids(parent: Supervisor) -> set[int]:
    return {child.process.pid for child in parent.children if child.ready and not child.retiring}


def test_children_are_named_after_the_worker_and_their_index() -> None:
    assert child_hostname("w1@example.com", 2) == "w1-2@example.com"
    assert child_hostname("w1", 1) == "w1-1"


def test_exits_are_described_as_celery_does() -> None:
    assert describe_exit(0) == "exitcode 0"
    assert describe_exit(1) == "exitcode 1"
    assert describe_exit(-signal.SIGKILL) == "signal 9 (SIGKILL)"


@pytest.mark.slow
async def test_a_killed_child_is_replaced_and_stop_ends_them_all(caplog: pytest.LogCaptureFixture) -> None:
    # Given: two children running
    caplog.set_level(logging.INFO, "aqueue.worker")
    parent = Supervisor(command(lambda n: "serve"), 2, "w@test")
    run = asyncio.create_task(parent.run())
    await until(lambda: len(ready_pids(parent)) == 2)
    first = ready_pids(parent)

    # When: one is killed
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    # Then: a new one replaces it, and the exit cause is logged
    await until(lambda: len(ready_pids(parent)) == 2 and victim not in ready_pids(parent))
    assert f"pid:{victim} exited with 'signal 9 (SIGKILL)'; starting a new one in 1.0s" in caplog.text

    # When: asked to stop, then every child stops and the supervisor returns 0
    parent.request_stop()
    with anyio.fail_after(10):
        assert await run == 0
    assert parent.children == set()
    assert "all 2 processes ready" in caplog.text


async def test_a_child_that_fails_before_any_was_ready_stops_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parent = Supervisor(command(lambda n: "fail"), 2, "w@test")
    with anyio.fail_after(10):
        assert await parent.run() == 1
    assert "exited with 'exitcode 3' before it was ready; stopping" in caplog.text


async def test_a_retiring_child_is_replaced_before_it_exits(caplog: pytest.LogCaptureFixture) -> None:
    # Given: a first child that retires at once, and replacements that serve
    caplog.set_level(logging.INFO, "aqueue.worker")
    parent = Supervisor(command(lambda n: "retire" if n == 0 else "serve"), 1, "w@test")
    run = asyncio.create_task(parent.run())

    # Then: its replacement starts, with no backoff, and its exit is logged as a recycling
    await until(lambda: len(ready_pids(parent)) == 1 and "(recycled)" in caplog.text)
    assert "is being recycled; starting its replacement" in caplog.text
    assert "exited with 'exitcode 0' (recycled)" in caplog.text
    parent.request_stop()
    with anyio.fail_after(10):
        assert await run == 0


async def test_children_get_the_environment_and_each_exit_is_reported_with_its_pid() -> None:
    # Given: extra variables for the children, and a first child that retires at once
    exited: list[int] = []
    parent = Supervisor(
        command(lambda n: "retire" if n == 0 else "serve"),
        1,
        "w@test",
        environment={"AQUEUE_TEST_MARK": "marked"},
        on_exit=exited.append,
    )
    run = asyncio.create_task(parent.run())
    await until(lambda: len(ready_pids(parent)) == 1 and len(exited) == 1)
    [serving] = ready_pids(parent)

    # Then: the child has the variables on top of the parent's environment
    environ = Path(f"/proc/{serving}/environ").read_bytes().split(b"\0")
    assert b"AQUEUE_TEST_MARK=marked" in environ
    assert f"PATH={os.environ['PATH']}".encode() in environ

    # And: every child that exits is reported once, by pid, the retired one first
    parent.request_stop()
    with anyio.fail_after(10):
        assert await run == 0
    assert exited[1:] == [serving] and exited[0] != serving


def test_backoff_doubles_for_quick_deaths_and_resets_after_a_stable_run() -> None:
    parent = Supervisor(command(lambda n: "serve"), 1, "w@test")
    assert [parent._backoff(1, 0.5) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert parent._backoff(1, supervisor.STABLE) == 0.0
    assert parent._backoff(1, 0.5) == 1.0
