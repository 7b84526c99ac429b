"""sqlite:///path.db — results in one SQLite file that several processes on this machine share.

One :class:`~aqueue._sqlite.SQLiteConnection` per backend (WAL, a busy timeout, statements on a thread of
its own). Each result is one row, replaced on every store.
Rows past ``expires`` read as missing and are deleted now and then. Storing a final state wakes the
processes waiting for results (:mod:`aqueue._wakeups`, after the commit), which read the rows they wait
for at once: ``wait`` reads every ``wakeup_fallback`` seconds only to make up for a lost wake-up (where
there can be no wake-ups, it polls, backing off to ``poll_interval``). One loop turn's stores are one
transaction.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import sqlite3
import time
from collections.abc import Collection
from functools import partial

from aqueue._sqlite import Batch, SQLiteConnection, quick, transaction
from aqueue._wakeups import Listener
from aqueue.exceptions import OperationalError, TimeoutError
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.urls import sqlite_path

__all__ = ["SQLiteBackend"]

logger = logging.getLogger(__name__)
_Row = tuple[str, bytes, float | None, bool]
"""A store: task id, data, expiry and whether the state is final."""
_PRUNE_EVERY = 60.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS aqueue_results "
    "(task_id TEXT PRIMARY KEY, data BLOB NOT NULL, expires_at REAL);"
    "CREATE TABLE IF NOT EXISTS aqueue_chord_parts "
    "(group_id TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL, expires_at REAL NOT NULL, "
    "PRIMARY KEY (group_id, idx));"
    "CREATE TABLE IF NOT EXISTS aqueue_chords "
    "(group_id TEXT PRIMARY KEY, fired INTEGER NOT NULL, sent INTEGER NOT NULL, expires_at REAL NOT NULL)"
)


class SQLiteBackend(ResultBackend):
    """Task results in a SQLite file."""

    poll_interval = 0.1
    wakeup_fallback = 0.5
    """Seconds between two reads while ``wait`` is woken by the processes storing results (the reads
    make up for a lost wake-up)."""

    def __init__(self, url: str, serializer: str = "json", expires: float | None = None) -> None:
        """Raises: InvalidURL when ``url`` is not ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
        super().__init__(url, serializer, expires)
        self.path = sqlite_path(url)
        self._db = SQLiteConnection(self.path, _SCHEMA, "SQLite result backend")
        self._listener = Listener(self._db.wakeups, "r", self._notice)
        self._waiting: dict[str, set[asyncio.Future[bytes]]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._stores: Batch[_Row] = Batch(self._write)
        self._pruned = 0.0

    async def connect(self) -> None:
        await self._db.run(lambda db: None)

    async def aclose(self) -> None:
        for task in self._checks:
            task.cancel()
        await self._stores.aclose()
        self._listener.close()
        await self._db.aclose()

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskMeta:
        if not self._listener.listen():
            return await super().wait(task_id, timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            waiter: asyncio.Future[bytes] = loop.create_future()
            waiters = self._waiting.setdefault(task_id, set())
            waiters.add(waiter)
            try:
                meta = await self.get(task_id)  # after registering: a store from now on resolves the waiter
                if meta.ready:
                    return meta
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"The operation timed out waiting for task {task_id}.")
                try:
                    pause = self.wakeup_fallback if left is None else min(self.wakeup_fallback, left)
                    meta = self._decode(await asyncio.wait_for(waiter, pause))
                except builtins.TimeoutError:
                    pass  # the poll: a wake-up may have been lost
                else:
                    if meta.ready:
                        return meta
            finally:
                waiters.discard(waiter)
                if not waiters:
                    self._waiting.pop(task_id, None)

    def _decode(self, data: bytes) -> TaskMeta:
        return TaskMeta.from_dict(self.serializer.decode(data))

    def _notice(self, task_ids: set[str] | None) -> None:
        """Another process stored ``task_ids`` (None: maybe any): read the ones waited for, together."""
        wanted = self._waiting.keys() if task_ids is None else task_ids & self._waiting.keys()
        if wanted:
            task = asyncio.get_running_loop().create_task(self._check(list(wanted)))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check(self, task_ids: list[str]) -> None:
        try:
            rows = await self._db.run(partial(_select_many, task_ids), quick=quick(len(task_ids)))
        except OperationalError as exc:  # the waiters read again at their next poll
            logger.debug("Reading %d woken results failed: %s", len(task_ids), exc)
            return
        for task_id, data in rows:
            self._resolve(task_id, data)

    def _resolve(self, task_id: str, data: bytes) -> None:
        for waiter in self._waiting.get(task_id, ()):
            if not waiter.done():
                waiter.set_result(data)

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        now = time.time()
        expires_at = None if self.expires is None else now + self.expires
        await self._stores.add((task_id, data, expires_at, meta.ready))
        if self.expires is not None and now - self._pruned > _PRUNE_EVERY:
            self._pruned = now
            await self._db.run(_prune)

    async def _write(self, rows: list[_Row]) -> None:
        """One loop turn's stores, in one transaction; then the waiters for the final ones are woken."""
        ready = [(task_id, data) for task_id, data, _, final in rows if final]
        wake = ("r", [task_id for task_id, _ in ready]) if ready else None
        fast = quick(len(rows), sum(len(row[1]) for row in rows))
        await self._db.run(partial(_upsert, rows), wake=wake, quick=fast)
        for task_id, data in ready:
            self._resolve(task_id, data)

    async def _get(self, task_id: str) -> bytes | None:
        return await self._db.run(partial(_select, task_id), quick=True)

    async def _delete(self, task_id: str) -> None:
        await self._db.run(partial(_remove, task_id), quick=True)

    async def _chord_join(
        self, group_id: str, index: int, size: int, data: bytes, ttl: float
    ) -> tuple[bool, bool, int | None, list[bytes] | None]:
        return await self._db.run(partial(_chord_join, group_id, index, size, data, time.time() + ttl))

    async def _chord_sent(self, group_id: str) -> None:
        await self._db.run(partial(_chord_sent, group_id))


def _upsert(rows: list[_Row], db: sqlite3.Connection) -> None:
    with transaction(db):
        db.executemany(
            "INSERT INTO aqueue_results (task_id, data, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (task_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
            [row[:3] for row in rows],
        )


def _select(task_id: str, db: sqlite3.Connection) -> bytes | None:
    row = db.execute(
        "SELECT data FROM aqueue_results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)",
        (task_id, time.time()),
    ).fetchone()
    return None if row is None else bytes(row[0])


def _select_many(task_ids: Collection[str], db: sqlite3.Connection) -> list[tuple[str, bytes]]:
    ids, now, rows = list(task_ids), time.time(), []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows += db.execute(
            f"SELECT task_id, data FROM aqueue_results WHERE task_id IN ({', '.join('?' * len(chunk))}) "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (*chunk, now),
        ).fetchall()
    return [(task_id, bytes(data)) for task_id, data in rows]


def _remove(task_id: str, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM aqueue_results WHERE task_id = ?", (task_id,))


def _prune(db: sqlite3.Connection) -> None:
    now = time.time()
    db.execute("DELETE FROM aqueue_results WHERE expires_at <= ?", (now,))
    db.execute("DELETE FROM aqueue_chord_parts WHERE expires_at <= ?", (now,))
    db.execute("DELETE FROM aqueue_chords WHERE expires_at <= ?", (now,))


def _chord_join(
    group_id: str, index: int, size: int, data: bytes, expires_at: float, db: sqlite3.Connection
) -> tuple[bool, bool, int | None, list[bytes] | None]:
    """One transaction: the part (unless there), then, once complete, the claim of the callback.

    ``fired`` is 1 + the index of the part whose report claimed the callback (0 before).
    """
    with transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO aqueue_chord_parts (group_id, idx, data, expires_at) VALUES (?, ?, ?, ?)",
            (group_id, index, data, expires_at),
        )
        rows = db.execute(
            "SELECT data FROM aqueue_chord_parts WHERE group_id = ? ORDER BY idx", (group_id,)
        ).fetchall()
        if len(rows) < size:
            return False, False, None, None
        db.execute(
            "INSERT OR IGNORE INTO aqueue_chords (group_id, fired, sent, expires_at) VALUES (?, 0, 0, ?)",
            (group_id, expires_at),
        )
        claim = db.execute(
            "UPDATE aqueue_chords SET fired = ? WHERE group_id = ? AND fired = 0", (index + 1, group_id)
        )
        fired, sent = db.execute(
            "SELECT fired, sent FROM aqueue_chords WHERE group_id = ?", (group_id,)
        ).fetchone()
        return claim.rowcount == 1, bool(sent), fired - 1, [bytes(row[0]) for row in rows]


def _chord_sent(group_id: str, db: sqlite3.Connection) -> None:
    db.execute("UPDATE aqueue_chords SET sent = 1 WHERE group_id = ?", (group_id,))
