"""One SQLite connection on a thread of its own, shared by the SQLite broker and result backend.

WAL mode (readers do not block the writer), a busy timeout, and every statement on one dedicated
thread, so the event loop never waits on the disk. Writes are short ``BEGIN IMMEDIATE`` transactions,
so processes sharing the file take turns quickly.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from aqueue.exceptions import OperationalError

__all__ = ["SQLiteConnection", "transaction"]

logger = logging.getLogger("aqueue.sqlite")
T = TypeVar("T")


class SQLiteConnection:
    """One sqlite3 connection, used only from its own thread; opened on first use with ``schema``."""

    def __init__(self, path: Path, schema: str, role: str) -> None:
        self.path, self.schema, self.role = path, schema, role
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="aqueue-sqlite")
        return asyncio.wrap_future(self._executor.submit(self._call, fn))

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        on_cancel: Callable[[asyncio.Future[T]], None] | None = None,
    ) -> T:
        """Run ``fn(connection)`` on the thread. Once submitted it runs to the end, even if the caller is
        cancelled (so a cancelled ack still happens); ``on_cancel`` then receives its outcome."""
        future = self._submit(fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(on_cancel or _log_failure)
            raise

    def run_soon(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        """Run ``fn(connection)`` without waiting for it, unless the connection is closed."""
        if self._executor is not None:
            self._submit(fn).add_done_callback(_log_failure)

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.wrap_future(executor.submit(self._close))
            executor.shutdown(wait=False)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._db is None:
                self._db = _open(self.path, self.schema)
            return fn(self._db)
        except (sqlite3.Error, OSError) as exc:
            raise OperationalError(f"{self.role} {self.path}: {exc}") from exc

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


def _open(path: Path, schema: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL keeps every commit across a process crash (SIGKILL); only an OS crash may lose the last ones.
    db.execute("PRAGMA synchronous=NORMAL")
    with transaction(db):
        for statement in schema.split(";"):
            if statement.strip():
                db.execute(statement)
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so the busy timeout applies instead of a deadlock error.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        logger.warning("SQLite: %s", exc)
