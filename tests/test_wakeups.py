"""Wake-up sockets beside a SQLite file: who is woken, stale sockets, full queues, long paths."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aqueue._wakeups import _FULL, Listener, Wakeups


class Inbox:
    """A listener's notices, as a test reads them."""

    def __init__(self) -> None:
        self.notices: list[set[str] | None] = []
        self.arrived = asyncio.Event()

    def __call__(self, names: set[str] | None) -> None:
        self.notices.append(names)
        self.arrived.set()

    async def next(self) -> set[str] | None:
        with anyio.fail_after(5):
            await self.arrived.wait()
        self.arrived.clear()
        return self.notices.pop(0)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def sockets(database: Path) -> list[str]:
    return sorted(os.listdir(database.with_name(database.name + "-wake")))


async def test_a_sender_wakes_the_other_listeners_of_that_kind(database: Path) -> None:
    # Given a broker listener and a result listener, each of its own "process", and a third sender
    brokers, results = Inbox(), Inbox()
    broker = Listener(Wakeups(database), "b", brokers)
    result = Listener(Wakeups(database), "r", results)
    assert broker.listen() and result.listen()
    sender = Wakeups(database)
    # When the sender announces two queues to brokers, then a result to result backends
    sender.send("b", ["celery", "other"])
    sender.send("r", ["task-1"])
    # Then each listener hears only what is meant for its kind
    assert await brokers.next() == {"celery", "other"}
    assert await results.next() == {"task-1"}
    await asyncio.sleep(0.05)
    assert (brokers.notices, results.notices) == ([], [])
    # And closing a listener deletes its socket
    broker.close()
    result.close()
    assert sockets(database) == []
    sender.close()


async def test_own_socket_is_not_sent_to(database: Path) -> None:
    # Given a listener and a sender of the same holder (woken in-process instead)
    inbox = Inbox()
    wakeups = Wakeups(database)
    listener = Listener(wakeups, "b", inbox)
    assert listener.listen()
    # When it sends, then its own listener reads nothing
    wakeups.send("b", ["celery"])
    await asyncio.sleep(0.05)
    assert inbox.notices == [] and listener.received == 0
    listener.close()
    wakeups.close()


async def test_a_dead_processs_socket_is_deleted_and_the_live_ones_still_woken(database: Path) -> None:
    # Given the socket of a process that was killed (SIGKILL: bound, never closed), and a live listener
    folder = database.with_name(database.name + "-wake")
    folder.mkdir()
    bind = "import socket, sys, time; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(sys.argv[1]); "
    bind += "print(flush=True); time.sleep(60)"
    command = [sys.executable, "-c", bind, str(folder / "b-1-deadbeef.sock")]
    with subprocess.Popen(command, stdout=subprocess.PIPE) as dead:
        assert dead.stdout is not None
        dead.stdout.readline()
        dead.kill()
    assert sockets(database) == ["b-1-deadbeef.sock"]
    inbox = Inbox()
    live = Listener(Wakeups(database), "b", inbox)
    assert live.listen()
    # When another process sends
    sender = Wakeups(database)
    sender.send("b", ["celery"])
    # Then the live listener is woken, and the dead socket is gone
    assert await inbox.next() == {"celery"}
    assert sockets(database) == [live._name]
    live.close()
    sender.close()


async def test_a_full_queue_makes_the_listener_check_everything(database: Path) -> None:
    # Given a listener whose loop does not read while more wake-ups come than its queue holds
    inbox = Inbox()
    listener = Listener(Wakeups(database), "r", inbox)
    assert listener.listen()
    sender = Wakeups(database)
    for i in range(_FULL + 5):
        sender.send("r", [f"task-{i}"])  # the last ones are dropped
    # When the loop reads, then the notice says "maybe anything" rather than naming what it got
    assert await inbox.next() is None
    listener.close()
    sender.close()


async def test_a_path_too_long_for_a_socket_address_still_works(tmp_path: Path) -> None:
    # Given a database whose folder path is longer than a socket address can be
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    database = deep / "queue.db"
    inbox = Inbox()
    listener = Listener(Wakeups(database), "b", inbox)
    # When a listener binds and another holder sends, then it is woken all the same
    assert listener.listen()
    sender = Wakeups(database)
    sender.send("b", ["celery"])
    assert await inbox.next() == {"celery"}
    listener.close()
    assert sockets(database) == []
    sender.close()


async def test_no_folder_for_sockets_means_no_wake_ups(
    database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a file where the folder of sockets would be
    database.with_name(database.name + "-wake").write_text("")
    caplog.set_level("INFO", "aqueue.sqlite")
    listener = Listener(Wakeups(database), "b", Inbox())
    # When a listener tries to bind, then it says so once and reports that waiters must poll
    assert not listener.listen()
    assert not listener.listen()
    assert [r.getMessage() for r in caplog.records if "poll" in r.getMessage()] == [
        f"No wake-ups in {database}-wake ([Errno 17] File exists: '{database}-wake'): waiting processes poll"
    ]
    # And a sender finds nobody to wake
    Wakeups(database).send("b", ["celery"])
