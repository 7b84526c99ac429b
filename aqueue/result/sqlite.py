"""sqlite:///path.db — results in one SQLite file that several processes on this machine share.

One :class:`~aqueue._sqlite.SQLiteConnection` per backend (WAL, a busy timeout, statements on a thread of
its own). Each result is one row, replaced on every store.
Rows past ``expires`` read as missing and are deleted now and then. SQLite cannot notify other
processes, so ``wait`` polls (backing off to ``poll_interval``).
"""

from __future__ import annotations

import sqlite3
import time
from functools import partial

from aqueue._sqlite import SQLiteConnection, transaction
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.urls import sqlite_path

__all__ = ["SQLiteBackend"]

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

    def __init__(self, url: str, serializer: str = "json", expires: float | None = None) -> None:
        """Raises: InvalidURL when ``url`` is not ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
        super().__init__(url, serializer, expires)
        self.path = sqlite_path(url)
        self._db = SQLiteConnection(self.path, _SCHEMA, "SQLite result backend")
        self._pruned = 0.0

    async def connect(self) -> None:
        await self._db.run(lambda db: None)

    async def aclose(self) -> None:
        await self._db.aclose()

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        now = time.time()
        expires_at = None if self.expires is None else now + self.expires
        await self._db.run(partial(_upsert, task_id, data, expires_at))
        if self.expires is not None and now - self._pruned > _PRUNE_EVERY:
            self._pruned = now
            await self._db.run(_prune)

    async def _get(self, task_id: str) -> bytes | None:
        return await self._db.run(partial(_select, task_id))

    async def _delete(self, task_id: str) -> None:
        await self._db.run(partial(_remove, task_id))

    async def _chord_join(
        self, group_id: str, index: int, size: int, data: bytes, ttl: float
    ) -> tuple[bool, bool, list[bytes] | None]:
        return await self._db.run(partial(_chord_join, group_id, index, size, data, time.time() + ttl))

    async def _chord_sent(self, group_id: str) -> None:
        await self._db.run(partial(_chord_sent, group_id))


def _upsert(task_id: str, data: bytes, expires_at: float | None, db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO aqueue_results (task_id, data, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (task_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
        (task_id, data, expires_at),
    )


def _select(task_id: str, db: sqlite3.Connection) -> bytes | None:
    row = db.execute(
        "SELECT data FROM aqueue_results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)",
        (task_id, time.time()),
    ).fetchone()
    return None if row is None else bytes(row[0])


def _remove(task_id: str, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM aqueue_results WHERE task_id = ?", (task_id,))


def _prune(db: sqlite3.Connection) -> None:
    now = time.time()
    db.execute("DELETE FROM aqueue_results WHERE expires_at <= ?", (now,))
    db.execute("DELETE FROM aqueue_chord_parts WHERE expires_at <= ?", (now,))
    db.execute("DELETE FROM aqueue_chords WHERE expires_at <= ?", (now,))


def _chord_join(
    group_id: str, index: int, size: int, data: bytes, expires_at: float, db: sqlite3.Connection
) -> tuple[bool, bool, list[bytes] | None]:
    """One transaction: the part (unless there), then, once complete, the claim of the callback."""
    with transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO aqueue_chord_parts (group_id, idx, data, expires_at) VALUES (?, ?, ?, ?)",
            (group_id, index, data, expires_at),
        )
        rows = db.execute(
            "SELECT data FROM aqueue_chord_parts WHERE group_id = ? ORDER BY idx", (group_id,)
        ).fetchall()
        if len(rows) < size:
            return False, False, None
        db.execute(
            "INSERT OR IGNORE INTO aqueue_chords (group_id, fired, sent, expires_at) VALUES (?, 0, 0, ?)",
            (group_id, expires_at),
        )
        first = db.execute("UPDATE aqueue_chords SET fired = 1 WHERE group_id = ? AND fired = 0", (group_id,))
        (sent,) = db.execute("SELECT sent FROM aqueue_chords WHERE group_id = ?", (group_id,)).fetchone()
        return first.rowcount == 1, bool(sent), [bytes(row[0]) for row in rows]


def _chord_sent(group_id: str, db: sqlite3.Connection) -> None:
    db.execute("UPDATE aqueue_chords SET sent = 1 WHERE group_id = ?", (group_id,))
