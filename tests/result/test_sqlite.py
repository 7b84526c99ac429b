"""What the SQLite result backend does beyond the contract: expiry, sharing a file, URL paths."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import textwrap
from contextlib import closing
from functools import partial
from pathlib import Path

import anyio
import pytest

from aqueue import states
from aqueue._wakeups import _FULL, Wakeups
from aqueue.exceptions import InvalidURL
from aqueue.result import TaskMeta
from aqueue.result.sqlite import SQLiteBackend


async def test_results_expire_and_are_pruned(tmp_path: Path) -> None:
    # Given a result stored with a short expiry
    url = f"sqlite:///{tmp_path}/results.db"
    async with SQLiteBackend(url, expires=0.2) as backend:
        await backend.store(TaskMeta("old", states.SUCCESS, 1))
        assert (await backend.get("old")).status == states.SUCCESS
        # When the expiry has passed
        await anyio.sleep(0.3)
        # Then the result reads as PENDING
        assert (await backend.get("old")).status == states.PENDING
    # And a later store (here from another backend) deletes the expired row
    async with SQLiteBackend(url, expires=60) as other:
        await other.store(TaskMeta("new", states.SUCCESS, 2))
    with closing(sqlite3.connect(tmp_path / "results.db")) as db:
        assert [row[0] for row in db.execute("SELECT task_id FROM aqueue_results")] == ["new"]


async def test_two_backends_on_one_file_see_each_other(tmp_path: Path) -> None:
    # Given two backends on one file, as a worker and a client process would have
    url = f"sqlite:///{tmp_path}/shared.db"
    async with SQLiteBackend(url) as worker, SQLiteBackend(url) as client:
        # When the worker stores a result while the client waits for it
        async def finish() -> None:
            await anyio.sleep(0.1)
            await worker.store(TaskMeta("t1", states.SUCCESS, [4, 4]))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(finish)
                meta = await client.wait("t1", timeout=4)
        # Then the client gets it
        assert (meta.status, meta.result) == (states.SUCCESS, [4, 4])


async def test_relative_url_is_relative_to_the_working_directory(tmp_cwd: Path) -> None:
    # Given a relative sqlite URL whose folder does not exist yet
    async with SQLiteBackend("sqlite:///data/results.db") as backend:
        # When a result is stored
        await backend.store(TaskMeta("t1", states.SUCCESS, 1))
    # Then the file is created under the working directory
    assert (tmp_cwd / "data" / "results.db").is_file()


async def test_absolute_url_has_four_slashes(tmp_path: Path) -> None:
    # Given an absolute sqlite URL
    path = tmp_path / "abs" / "results.db"
    async with SQLiteBackend(f"sqlite:///{path}") as backend:
        await backend.store(TaskMeta("t1", states.SUCCESS, 1))
    # Then the file is at that absolute path
    assert path.is_file()


def test_url_without_a_path_is_rejected() -> None:
    # Given a sqlite URL with no file, then it is refused with the expected forms
    with pytest.raises(InvalidURL, match="sqlite:////absolute"):
        SQLiteBackend("sqlite://")


async def waiting(backend: SQLiteBackend, count: int = 1) -> None:
    """Wait until ``count`` tasks' results are waited for in ``backend``."""
    with anyio.fail_after(10):
        while len(backend._waiting) < count:
            await anyio.sleep(0.01)


def store_raw(path: Path, metas: list[TaskMeta], backend: SQLiteBackend) -> None:
    """Store results as a process would that sends no wake-up (one killed between commit and wake-up)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executemany(
            "INSERT INTO aqueue_results (task_id, data) VALUES (?, ?)",
            [(meta.task_id, backend.serializer.dumps(meta.to_dict())) for meta in metas],
        )


async def test_a_waiter_is_woken_by_a_store_in_another_process(tmp_path: Path) -> None:
    # Given a client waiting for a result, which would read again only once an hour
    url = f"sqlite:///{tmp_path}/results.db"
    script = textwrap.dedent("""
        import asyncio, sys
        from aqueue import states
        from aqueue.result import TaskMeta
        from aqueue.result.sqlite import SQLiteBackend

        async def main():
            async with SQLiteBackend(sys.argv[1]) as backend:
                await backend.store(TaskMeta("t1", states.SUCCESS, 8))

        asyncio.run(main())
    """)
    async with SQLiteBackend(url) as client, anyio.create_task_group() as tg:
        client.wakeup_fallback = 3600
        with anyio.fail_after(20):
            waiter = asyncio.create_task(client.wait("t1"))
            await waiting(client)
            # When another process stores it
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
            tg.start_soon(partial(anyio.run_process, [sys.executable, "-c", script, url], env=env))
            # Then the client is woken and returns it
            meta = await waiter
        assert (meta.status, meta.result) == (states.SUCCESS, 8)
        assert client._listener.received >= 1


async def test_a_missed_wake_up_is_made_up_by_the_poll(tmp_path: Path) -> None:
    # Given a client waiting for a result, reading again every 0.2 s
    async with SQLiteBackend(f"sqlite:///{tmp_path}/results.db") as client:
        client.wakeup_fallback = 0.2
        with anyio.fail_after(20):
            waiter = asyncio.create_task(client.wait("t1"))
            await waiting(client)
            # When the result is stored with no wake-up
            store_raw(client.path, [TaskMeta("t1", states.SUCCESS, 1)], client)
            # Then the next read finds it, without a wake-up
            assert (await waiter).status == states.SUCCESS
        assert client._listener.received == 0


async def test_dropped_wake_ups_make_every_waiter_read(tmp_path: Path) -> None:
    # Given a client waiting for 30 results (reading again only once an hour)
    async with SQLiteBackend(f"sqlite:///{tmp_path}/results.db") as client:
        client.wakeup_fallback = 3600
        with anyio.fail_after(20):
            waiters = [asyncio.create_task(client.wait(f"t{i}")) for i in range(30)]
            await waiting(client, 30)
            # When the results are stored, and more wake-ups come than its queue holds, none of them
            # naming these tasks (the ones that did were dropped)
            store_raw(client.path, [TaskMeta(f"t{i}", states.SUCCESS, i) for i in range(30)], client)
            sender = Wakeups(client.path)
            for i in range(_FULL + 5):
                sender.send("r", [f"other-{i}"])
            sender.close()
            # Then every waiter reads its result
            assert [meta.result for meta in await asyncio.gather(*waiters)] == list(range(30))
