"""What the SQLite result backend does beyond the contract: expiry, sharing a file, URL paths."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from aqueue import states
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
