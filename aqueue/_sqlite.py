"""A broker's or a result backend's hold on its SQLite file: where statements run, and what follows a write.

WAL mode (readers do not block the writer) and short ``BEGIN IMMEDIATE`` write transactions, so
processes sharing the file take turns quickly. Each holder has two connections:

- a *quick* call (a statement or two over a few rows: one publish, a claim, an ack, one loop turn's
  results) runs at once on the event loop's thread, on a connection used only there: it takes tens of
  µs, where handing it to a thread and back costs over a hundred on a busy machine. When the file is
  locked by another writer it tries twice more within about 0.2 ms, then hands the call over;
- everything else (opening the file, long statements, quick calls that found the file locked) runs on
  a connection of its own on a thread of its own, which tries a locked file again after 0.1 ms,
  backing off to 5 ms, for up to 10 s. (SQLite's own busy handler sleeps 1 ms, then 2, then 5: too long
  for another process's transaction of a few tens of µs.)

Nothing on the loop's thread waits for the disk: a commit does not sync (``synchronous=NORMAL`` syncs
the WAL at checkpoints only), and checkpoints run on a third connection and thread, PASSIVE (they never
block a reader or a writer), while the WAL is longer than 4 MB; SQLite's automatic checkpoint, which
runs inside a commit, is off. :class:`Batch` makes one loop turn's acks or results one transaction.
After each write, the wake-ups (:mod:`aqueue._wakeups`) go to the processes that wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from aqueue._wakeups import Wakeups
from aqueue.exceptions import OperationalError

__all__ = ["QUICK_ROWS", "Batch", "SQLiteConnection", "quick", "transaction"]

logger = logging.getLogger("aqueue.sqlite")
T = TypeVar("T")
Item = TypeVar("Item")
Wake = tuple[str, Collection[str]]
"""A wake-up to send after a write: the kind of waiter and the names that changed."""

QUICK_ROWS = 32
"""The most rows a quick call touches."""
_QUICK_BYTES = 256 << 10
_QUICK_RETRIES = (0.00005, 0.0001, 0.0)
_BUSY_TIMEOUT = 10.0
_SQLITE_BUSY = 5
_CHECKPOINT_CHECK = 0.02
_WAL_KEEP = 4 << 20


class SQLiteConnection:
    """A broker's or a backend's hold on the file: a connection for quick calls, used on the event
    loop's thread, and one on a thread of its own for the rest; both opened on first use."""

    def __init__(self, path: Path, schema: str, role: str) -> None:
        self.path, self.schema, self.role = path, schema, role
        self.wakeups = Wakeups(path)
        self._db: sqlite3.Connection | None = None
        self._quick: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._checkpoints = _Checkpoints(path)

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        on_cancel: Callable[[asyncio.Future[T]], None] | None = None,
        wake: Wake | None = None,
        *,
        quick: bool = False,
    ) -> T:
        """Run ``fn(connection)``, then send ``wake`` to the other processes' waiters.

        ``quick``: ``fn`` is a statement or two over a few rows, run at once on this thread unless the
        file is locked. Otherwise it runs on the connection's thread; once submitted there it runs to the
        end, even if the caller is cancelled (so a cancelled ack still happens), and ``on_cancel`` then
        receives its outcome."""
        if quick and self._quick is not None:
            for pause in _QUICK_RETRIES:
                try:
                    result = fn(self._quick)
                except (sqlite3.Error, OSError) as exc:
                    if not _busy(exc):
                        raise OperationalError(f"{self.role} {self.path}: {exc}") from exc
                    if pause:
                        time.sleep(pause)
                else:
                    self._after(wake)
                    return result
        future = self._submit(fn, wake)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(on_cancel or _log_failure)
            raise

    def run_soon(self, fn: Callable[[sqlite3.Connection], Any], wake: Wake | None = None) -> None:
        """Run ``fn(connection)`` on the thread without waiting for it, unless the connection is closed."""
        if self._executor is not None:
            self._submit(fn, wake).add_done_callback(_log_failure)

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        quick, self._quick = self._quick, None
        if executor is not None:
            await asyncio.wrap_future(executor.submit(self._close, quick))
            executor.shutdown(wait=False)
        self.wakeups.close()
        await self._checkpoints.aclose()

    def _submit(self, fn: Callable[[sqlite3.Connection], T], wake: Wake | None) -> asyncio.Future[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="aqueue-sqlite")
        future = asyncio.wrap_future(self._executor.submit(self._call, fn))
        future.add_done_callback(partial(self._finished, wake))
        return future

    def _finished(self, wake: Wake | None, future: asyncio.Future[Any]) -> None:
        self._after(None if future.cancelled() or future.exception() else wake)

    def _after(self, wake: Wake | None) -> None:
        if wake is not None:
            self.wakeups.send(*wake)
        self._checkpoints.check()

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return _retry_busy(lambda: fn(self._connection()))
        except (sqlite3.Error, OSError) as exc:
            raise OperationalError(f"{self.role} {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = _open(self.path, self.schema)
            self._quick = _connect(self.path)
        return self._db

    def _close(self, quick: sqlite3.Connection | None) -> None:
        db, self._db = self._db, None
        for each in (db, quick):
            if each is not None:
                each.close()


def quick(rows: int, size: int = 0) -> bool:
    """Whether writing ``rows`` rows of ``size`` bytes in all is a quick call."""
    return rows <= QUICK_ROWS and size <= _QUICK_BYTES


class Batch(Generic[Item]):
    """What one event-loop turn adds, written by one call of ``write(items)`` (one transaction instead
    of one per item); while a write runs, the next batch gathers."""

    def __init__(self, write: Callable[[list[Item]], Awaitable[None]]) -> None:
        self._write = write
        self._items: list[Item] = []
        self._done: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def add(self, item: Item) -> None:
        """Returns once ``item`` is written (even if the caller is cancelled, it will be).

        Raises:
            OperationalError: the write failed."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self._flusher is None:
                self._flusher = asyncio.create_task(self._flush())
        self._items.append(item)
        await asyncio.shield(self._done)

    async def _flush(self) -> None:
        try:
            while self._done is not None:
                items, done = self._items, self._done
                self._items, self._done = [], None
                try:
                    await self._write(items)
                except Exception as exc:
                    done.set_exception(exc)
                    done.add_done_callback(_retrieved)
                else:
                    done.set_result(None)
        finally:
            self._flusher = None

    async def aclose(self) -> None:
        """Wait for the writes under way."""
        if self._flusher is not None:
            await asyncio.wait([self._flusher])


class _Checkpoints:
    """PASSIVE checkpoints on a thread and a connection of their own, one at a time, while the WAL is
    longer than ``_WAL_KEEP`` (after a checkpoint, the next writer starts the WAL again and cuts it to
    that length)."""

    def __init__(self, path: Path) -> None:
        self.path, self.wal = path, path.with_name(path.name + "-wal")
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: asyncio.Future[None] | None = None
        self._next_check = 0.0

    def check(self) -> None:
        """After a write: start a checkpoint if one is due (the WAL's length is read every 20 ms)."""
        now = time.monotonic()
        if now < self._next_check or (self._running is not None and not self._running.done()):
            return
        self._next_check = now + _CHECKPOINT_CHECK
        try:
            if os.stat(self.wal).st_size <= _WAL_KEEP:
                return
        except OSError:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="aqueue-sqlite-checkpoint")
        self._running = asyncio.wrap_future(self._executor.submit(self._checkpoint))

    def _checkpoint(self) -> None:
        try:
            if self._db is None:
                self._db = sqlite3.connect(
                    self.path, timeout=0, isolation_level=None, check_same_thread=False
                )
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # busy (another process checkpoints) or gone: the next one will do
            logger.debug("SQLite checkpoint of %s: %s", self.path, exc)

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.wrap_future(executor.submit(self._close))
            executor.shutdown(wait=False)

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF == _SQLITE_BUSY


def _retry_busy(call: Callable[[], T]) -> T:
    """``call()``, again while the file is locked by another connection (each call is one transaction)."""
    pause, deadline = 0.0001, time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


def _open(path: Path, schema: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = _connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        with transaction(db):
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    # NORMAL keeps every commit across a process crash (SIGKILL); only an OS crash may lose the last ones.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")  # see _Checkpoints
    db.execute(f"PRAGMA journal_size_limit={_WAL_KEEP}")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a busy file is retried instead of a deadlock error.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _retrieved(future: asyncio.Future[Any]) -> None:
    future.exception()  # read, so that a failure every waiter was told of is not logged as unretrieved


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        logger.warning("SQLite: %s", exc)
