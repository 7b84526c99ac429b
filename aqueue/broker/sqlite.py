"""sqlite:///path.db — the embedded broker: several processes on one machine share one file, no server.

Every broker owns one :class:`~aqueue._sqlite.SQLiteConnection` (WAL, a busy timeout, statements on a
thread of its own, short write transactions).

Messages are rows of ``aqueue_messages``; a row is visible when ``visible_at <= now`` (publishing sets it
to the ETA, or now). A consumer claims rows with one ``UPDATE ... RETURNING`` that moves ``visible_at`` a
visibility timeout ahead and counts the delivery, so two processes never claim the same row. While the
consumer lives, it renews the claim of every delivery it holds each third of the timeout, so a long task
is not redelivered; when its process dies the claims lapse and the rows are delivered again, flagged
``redelivered``. Ack deletes the row, requeue makes it visible now, reject moves it to
``aqueue_dead_letters``. A settle applies only to the claim it came from (row id and delivery count): a
consumer whose claim lapsed cannot delete a message that another consumer is now running.

A consumer that finds nothing to claim sleeps until it is woken, the next row falls due (an ETA, a
lapsed claim), or its poll: ``polling_interval`` seconds at first, backing off to half a second (or to
``polling_interval``, when that is longer) while the queues stay empty. A publish, requeue or broadcast
wakes the consumers and subscribers of this broker at once, and those of other processes through
:mod:`aqueue._wakeups` (one datagram per waiting process, after the commit); the poll only makes up for
a wake-up that was lost. Finding a queue empty reads the file without taking the write lock, so idle
consumers never hold up a publisher; the acks of one loop turn are one transaction. Broadcasts are rows that subscribers read when woken, and poll
every 0.1 s; rows older than a minute are pruned. Priorities: a higher number is delivered first; among
equals, the oldest message first. The
marks of ``advance`` (beat's last due time sent per entry) are rows of ``aqueue_marks``.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

from aqueue._sqlite import QUICK_ROWS, Batch, SQLiteConnection, quick, transaction
from aqueue._wakeups import Listener
from aqueue.broker.base import Broker, Consumer, Delivery
from aqueue.exceptions import ImproperlyConfigured, OperationalError
from aqueue.message import Envelope
from aqueue.rates import Rate
from aqueue.urls import sqlite_path

__all__ = ["SQLiteBroker"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
Tag = tuple[int, int]
"""A claim: the row id and the delivery count the claim set."""

_OPTIONS = ("visibility_timeout", "polling_interval")
_MAX_PAUSE = 0.5
_BROADCAST_POLL = 0.1
_BROADCAST_KEEP = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS aqueue_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, msg_id TEXT NOT NULL, queue TEXT NOT NULL, body BLOB NOT NULL,
    content_type TEXT NOT NULL, priority INTEGER NOT NULL, visible_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS aqueue_messages_order ON aqueue_messages (queue, priority DESC, id);
CREATE TABLE IF NOT EXISTS aqueue_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, msg_id TEXT NOT NULL, queue TEXT NOT NULL, body BLOB NOT NULL,
    content_type TEXT NOT NULL, priority INTEGER NOT NULL, reason TEXT NOT NULL, rejected_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aqueue_broadcasts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, data BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aqueue_buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, stamp REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aqueue_marks (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


class SQLiteBroker(Broker):
    """A broker in one SQLite file that several processes on this machine may share."""

    def __init__(
        self, url: str, *, visibility_timeout: float = 30.0, polling_interval: float = 0.05, **options: Any
    ) -> None:
        """Parameters: ``visibility_timeout`` (seconds a claim lasts unless renewed) and ``polling_interval``.

        Raises:
            InvalidURL: ``url`` is not ``sqlite:///relative.db`` or ``sqlite:////absolute.db``.
            ImproperlyConfigured: an unknown option (names the closest one) or a duration that is not > 0.
        """
        if options:
            raise _unknown_option(next(iter(options)))
        if not (visibility_timeout > 0 and polling_interval > 0):
            raise ImproperlyConfigured("visibility_timeout and polling_interval must be seconds > 0")
        self.url, self.path = url, sqlite_path(url)
        self.visibility_timeout, self.polling_interval = float(visibility_timeout), float(polling_interval)
        self._db = SQLiteConnection(self.path, _SCHEMA, "SQLite broker")
        self._listener = Listener(self._db.wakeups, "b", self._notice)
        self._waiters: dict[asyncio.Future[bool], frozenset[str]] = {}
        self._notices = 0
        self._renewals: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        await self._db.run(lambda db: None)

    async def aclose(self) -> None:
        """Stop renewing claims and close the connection; unsettled deliveries lapse after the timeout."""
        for task in self._renewals:
            task.cancel()
        await asyncio.gather(*self._renewals, return_exceptions=True)
        self._listener.close()
        await self._db.aclose()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if envelopes:
            queues = {envelope.queue for envelope in envelopes}
            fast = quick(len(envelopes), sum(len(envelope.body) for envelope in envelopes))
            await self._db.run(partial(_insert, list(envelopes)), wake=("b", queues), quick=fast)
            self._notice(queues)

    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return _SQLiteConsumer(self, queues, prefetch)

    async def purge(self, queue: str) -> int:
        return await self._db.run(partial(_purge, queue))

    async def take_token(self, key: str, rate: Rate) -> float:
        """One token of the bucket ``key`` that every process on this file shares (one transaction)."""
        return await self._db.run(partial(_take_token, key, rate.per_second), quick=True)

    async def advance(self, key: str, value: float) -> float | None:
        """Raise the mark ``key`` that every process on this file shares (one transaction)."""
        return await self._db.run(partial(_advance, key, value))

    async def dead_letters(self, queue: str) -> list[Envelope]:
        """Envelopes rejected from ``queue``, oldest first."""
        rows = await self._db.run(partial(_dead_letters, queue))
        return [
            Envelope(msg_id, queue, body, ctype, None, priority or None)
            for msg_id, body, ctype, priority in rows
        ]

    async def broadcast(self, channel: str, data: bytes) -> None:
        await self._db.run(partial(_broadcast, channel, data), wake=("b", (channel,)), quick=True)
        self._notice({channel})

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        self._listener.listen()
        last = await self._db.run(partial(_last_broadcast, channel), quick=True)
        yield self._listen(channel, last)

    async def _listen(self, channel: str, last: int) -> AsyncIterator[bytes]:
        while True:
            notices = self._notices
            rows = await self._db.run(partial(_broadcasts_after, channel, last), quick=True)
            for _, data in rows:
                yield data
            if rows:
                last = rows[-1][0]
            elif notices == self._notices:
                await self._nap(_BROADCAST_POLL, (channel,))

    def _notice(self, names: set[str] | None) -> None:
        """Queues or channels named ``names`` changed (None: any may have): wake who waits on them."""
        self._notices += 1
        for waiter, interest in list(self._waiters.items()):
            if names is None or not interest.isdisjoint(names):
                del self._waiters[waiter]
                if not waiter.done():
                    waiter.set_result(True)

    async def _nap(self, timeout: float, names: Sequence[str]) -> bool:
        """Sleep ``timeout`` seconds, or less when woken about one of ``names``; whether it was woken."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = frozenset(names)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters.pop(waiter, None)


def _unknown_option(name: str) -> ImproperlyConfigured:
    close = difflib.get_close_matches(name, _OPTIONS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else f" Known options: {', '.join(_OPTIONS)}."
    return ImproperlyConfigured(f"Unknown SQLite broker option {name!r} in broker_transport_options.{hint}")


class _SQLiteConsumer(Consumer):
    def __init__(self, broker: SQLiteBroker, queues: Sequence[str], prefetch: int) -> None:
        super().__init__(queues, prefetch)
        self._broker = broker
        self._pause = broker.polling_interval
        self._longest_pause = max(_MAX_PAUSE, broker.polling_interval)
        self._claimed = 0
        self._acks = Batch(self._write_acks)
        self._renewal: asyncio.Task[None] | None = None
        self._closed = False

    async def _fetch(self, n: int) -> Sequence[Delivery]:
        self._start_renewal()
        broker = self._broker
        broker._listener.listen()
        while True:
            notices = broker._notices
            rows, due = await self._claim(n)
            if rows:
                break
            if notices != broker._notices:
                continue  # woken while claiming: what woke it may be after the claim's read
            pause = self._pause if due is None else max(0.001, min(self._pause, due - time.time()))
            if not await broker._nap(pause, self.queues):
                self._pause = min(self._pause * 2, self._longest_pause)
        self._pause = broker.polling_interval
        rows.sort(key=lambda row: (-row[5], row[0]))
        return [
            Delivery(self, msg_id, queue, body, ctype, count > 1, (rowid, count))
            for rowid, msg_id, queue, body, ctype, _, count in rows
        ]

    async def _claim(self, n: int) -> tuple[list[Any], float | None]:
        # A few rows at a time, at once, while they come a few at a time; all there is room for, on the
        # connection's thread, while the queue is full.
        fast = self._claimed < QUICK_ROWS
        timeout = self._broker.visibility_timeout
        claim = partial(_claim, self.queues, min(n, QUICK_ROWS) if fast else n, timeout)
        rows, due = await self._broker._db.run(claim, on_cancel=self._unclaim, quick=fast)
        self._claimed = len(rows)
        return rows, due

    def _unclaim(self, future: asyncio.Future[tuple[list[Any], float | None]]) -> None:
        """Cancelled while claiming: give the rows back now rather than after the visibility timeout."""
        if not future.cancelled() and future.exception() is None and (rows := future.result()[0]):
            tags = [(row[0], row[6]) for row in rows]
            self._broker._db.run_soon(partial(_settle, tags, "unclaim"), wake=("b", self.queues))

    async def _ack(self, delivery: Delivery) -> None:
        await self._acks.add(delivery.tag)

    async def _write_acks(self, tags: list[Tag]) -> None:
        await self._broker._db.run(partial(_settle, tags, "ack"), quick=quick(len(tags)))

    async def _reject(self, delivery: Delivery) -> None:
        await self._broker._db.run(partial(_settle, [delivery.tag], "reject"), quick=True)

    async def _requeue(self, delivery: Delivery) -> None:
        queues = (delivery.queue,)
        requeue = partial(_settle, [delivery.tag], "requeue")
        await self._broker._db.run(requeue, wake=("b", queues), quick=True)
        self._broker._notice(set(queues))

    async def aclose(self) -> None:
        await super().aclose()
        self._closed = True
        if not self.held and self._renewal is not None:
            self._renewal.cancel()

    def _start_renewal(self) -> None:
        if self._renewal is None:
            self._renewal = asyncio.get_running_loop().create_task(self._renew_claims())
            self._broker._renewals.add(self._renewal)
            self._renewal.add_done_callback(self._broker._renewals.discard)

    async def _renew_claims(self) -> None:
        """Keep held deliveries invisible to others; after aclose, until the last one is settled."""
        timeout = self._broker.visibility_timeout
        while not (self._closed and not self.held):
            await asyncio.sleep(timeout / 3)
            if tags := [delivery.tag for delivery in self.held.values()]:
                try:
                    await self._broker._db.run(partial(_renew, tags, timeout))
                except OperationalError as exc:
                    logger.warning("Could not renew %d claims in %s: %s", len(tags), self._broker.path, exc)


def _take_token(key: str, per_second: float, db: sqlite3.Connection) -> float:
    now = time.time()
    with transaction(db):
        row = db.execute("SELECT tokens, stamp FROM aqueue_buckets WHERE key = ?", (key,)).fetchone()
        tokens = 1.0 if row is None else min(1.0, row[0] + max(0.0, now - row[1]) * per_second)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / per_second
        tokens -= 1.0 if wait == 0.0 else 0.0
        db.execute(
            "INSERT OR REPLACE INTO aqueue_buckets (key, tokens, stamp) VALUES (?, ?, ?)", (key, tokens, now)
        )
    return wait


def _advance(key: str, value: float, db: sqlite3.Connection) -> float | None:
    with transaction(db):
        row = db.execute("SELECT value FROM aqueue_marks WHERE key = ?", (key,)).fetchone()
        if row is None or row[0] < value:
            db.execute("INSERT OR REPLACE INTO aqueue_marks (key, value) VALUES (?, ?)", (key, value))
    return None if row is None else float(row[0])


def _insert(envelopes: list[Envelope], db: sqlite3.Connection) -> None:
    now = time.time()
    rows = [
        (e.id, e.queue, e.body, e.content_type, e.priority or 0, now if e.eta is None else e.eta)
        for e in envelopes
    ]
    with transaction(db):
        db.executemany(
            "INSERT INTO aqueue_messages (msg_id, queue, body, content_type, priority, visible_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )


def _claim(
    queues: Sequence[str], n: int, timeout: float, db: sqlite3.Connection
) -> tuple[list[Any], float | None]:
    """Up to ``n`` visible rows, claimed; when there are none, the time the next row falls due."""
    now = time.time()
    marks = ", ".join("?" * len(queues))
    where = f"queue IN ({marks})"
    # Read first: finding nothing must not take the write lock a publisher is waiting for.
    probe = f"SELECT 1 FROM aqueue_messages WHERE {where} AND visible_at <= ? LIMIT 1"
    if not db.execute(probe, (*queues, now)).fetchone():
        due = f"SELECT min(visible_at) FROM aqueue_messages WHERE {where}"
        return [], db.execute(due, queues).fetchone()[0]
    rows = db.execute(
        "UPDATE aqueue_messages SET visible_at = ?, delivery_count = delivery_count + 1 WHERE id IN "
        f"(SELECT id FROM aqueue_messages WHERE {where} AND visible_at <= ? "
        "ORDER BY priority DESC, id LIMIT ?) "
        "RETURNING id, msg_id, queue, body, content_type, priority, delivery_count",
        (now + timeout, *queues, now, n),
    ).fetchall()
    return rows, None


_SETTLE = {
    "ack": ["DELETE FROM aqueue_messages WHERE id = :id AND delivery_count = :count"],
    "requeue": ["UPDATE aqueue_messages SET visible_at = :now WHERE id = :id AND delivery_count = :count"],
    "unclaim": [
        "UPDATE aqueue_messages SET visible_at = :now, delivery_count = delivery_count - 1 "
        "WHERE id = :id AND delivery_count = :count"
    ],
    "reject": [
        "INSERT INTO aqueue_dead_letters (msg_id, queue, body, content_type, priority, reason, rejected_at) "
        "SELECT msg_id, queue, body, content_type, priority, 'rejected', :now FROM aqueue_messages "
        "WHERE id = :id AND delivery_count = :count",
        "DELETE FROM aqueue_messages WHERE id = :id AND delivery_count = :count",
    ],
}


def _settle(tags: list[Tag], how: str, db: sqlite3.Connection) -> None:
    now = time.time()
    params = [{"now": now, "id": rowid, "count": count} for rowid, count in tags]
    with transaction(db):
        for statement in _SETTLE[how]:
            db.executemany(statement, params)


def _renew(tags: list[Tag], timeout: float, db: sqlite3.Connection) -> None:
    until = time.time() + timeout
    with transaction(db):
        db.executemany(
            "UPDATE aqueue_messages SET visible_at = ? WHERE id = ? AND delivery_count = ?",
            [(until, rowid, count) for rowid, count in tags],
        )


def _purge(queue: str, db: sqlite3.Connection) -> int:
    # Waiting rows only: a row claimed by a live consumer is left for it to settle.
    cursor = db.execute(
        "DELETE FROM aqueue_messages WHERE queue = ? AND (delivery_count = 0 OR visible_at <= ?)",
        (queue, time.time()),
    )
    return cursor.rowcount


def _dead_letters(queue: str, db: sqlite3.Connection) -> list[Any]:
    return db.execute(
        "SELECT msg_id, body, content_type, priority FROM aqueue_dead_letters WHERE queue = ? ORDER BY id",
        (queue,),
    ).fetchall()


def _broadcast(channel: str, data: bytes, db: sqlite3.Connection) -> None:
    now = time.time()
    with transaction(db):
        db.execute("DELETE FROM aqueue_broadcasts WHERE created < ?", (now - _BROADCAST_KEEP,))
        db.execute(
            "INSERT INTO aqueue_broadcasts (channel, data, created) VALUES (?, ?, ?)", (channel, data, now)
        )


def _last_broadcast(channel: str, db: sqlite3.Connection) -> int:
    row = db.execute("SELECT max(id) FROM aqueue_broadcasts WHERE channel = ?", (channel,)).fetchone()
    return int(row[0] or 0)


def _broadcasts_after(channel: str, last: int, db: sqlite3.Connection) -> list[Any]:
    return db.execute(
        "SELECT id, data FROM aqueue_broadcasts WHERE channel = ? AND id > ? ORDER BY id", (channel, last)
    ).fetchall()
