"""redis://, rediss:// and sentinel:// — task states as Redis keys; waiters are woken by pub/sub, not by polling.

A task's state lives at ``P celery-task-meta-<task id>`` (``P`` is ``global_keyprefix``), expiring after
``expires`` seconds (the ``result_expires`` setting) when that is set. The key, its JSON and the rest
are Celery's: storing a state also PUBLISHes it on a channel of the same name, and a key that holds a
SUCCESS is never overwritten (a task delivered twice does not replace its success), so Celery clients
read what aqueue workers store and the other way round.

Round trips are coalesced: what is issued in one event loop turn goes out in one round trip of at
most three commands: one Lua call for every store (GET to keep a SUCCESS, SET with the TTL, and
PUBLISH), one DEL, one MGET. Whatever is issued while it is in flight gathers for the next one. The
worker stores results one by one; each caller's await resolves when its own write is done.

``wait`` first reads the key while most recent waits found their state ready at their first read (as
when results are collected after the tasks were sent): such a state is returned in that one round
trip, without subscribing. Otherwise (as when each result is waited for right after its task was
sent) it goes straight to ONE pub/sub connection per backend, shared by all waiters: a waiter
subscribes to its task's channel (the SUBSCRIBEs of a loop turn go in one command, followed by a PING
whose reply shows they are in place), then reads the key, which closes the race with a result stored
before the subscription, then waits for the message. When the pub/sub connection drops, it reconnects
with backoff, subscribes again, and every waiter reads its key again.

Connections (redis.asyncio connections, RESP2, hiredis when installed): exactly two per backend,
whatever the load: one for the batched commands (batches go one after the other, so a pool would
add nothing), opened on first use, and the pub/sub one, opened when something first waits. 10,000
concurrent waits therefore use two connections. Both carry ``client_name`` (default
``aqueue-result``). Redis errors become :class:`~aqueue.exceptions.OperationalError`.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqueue._redis import dedicated_connection, exchange, pack, redis_client
from aqueue._tasks import cancel_until_done
from aqueue.exceptions import OperationalError, TimeoutError
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.urls import mask_password, parse

__all__ = ["RedisBackend"]

logger = logging.getLogger("aqueue.result.redis")

_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
_STOP_TIMEOUT = 5.0
"""Longest wait for the result listener's tasks to stop on close."""
_MAX_BATCH = 2000
_FOUND_WINDOW = 8
"""About how many recent waits decide whether the next one reads before it subscribes."""
_STORE = (Path(__file__).parent / "redis_store.lua").read_bytes()
_CHORD = (Path(__file__).parent / "redis_chord.lua").read_text()
Command = tuple[Any, ...]


class RedisBackend(ResultBackend):
    """Task states in Redis.

    Parameters:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS, or
            ``sentinel://host:port;sentinel://host:port[/db]`` (see :mod:`aqueue._redis`).
        serializer: how states are encoded (``json``, ``msgpack``, ``pickle``).
        expires: seconds a stored state lives (``result_expires``); ``None`` or 0 keeps it.
        global_keyprefix: prepended to every key and channel.
        client_name: the name both connections give themselves (``CLIENT LIST`` shows it).
        socket_timeout: the longest wait for a reply, in seconds.
        sentinel: with a ``sentinel://`` URL, ``master_name`` (required), ``sentinel_kwargs`` and
            ``min_other_sentinels``.

    Raises:
        InvalidURL: the URL is not a usable redis URL.
        ImproperlyConfigured: a ``sentinel://`` URL without ``master_name``.
    """

    def __init__(
        self,
        url: str,
        serializer: str = "json",
        expires: float | None = None,
        *,
        global_keyprefix: str = "",
        client_name: str = "aqueue-result",
        socket_timeout: float = 10.0,
        **sentinel: Any,
    ) -> None:
        super().__init__(url, serializer, expires)
        parse(url, kinds=self.schemes, role="result backend")
        self.prefix, self.timeout = global_keyprefix, socket_timeout
        self.ttl_ms = int(expires * 1000) if expires and expires > 0 else 0
        self.format = self.serializer.name if self.serializer.name in ("json", "msgpack") else ""
        self._open(url, client_name, sentinel)
        self._found_ready = 1.0
        """How often a wait's first read found the state ready, of late (a moving average, 0 to 1)."""

    schemes: tuple[str, ...] = ("redis", "rediss", "sentinel")

    def _open(self, url: str, client_name: str, options: dict[str, Any]) -> None:
        """Make the client and connections (``options``: Sentinel's)."""
        self._client = redis_client(url, options, setting="result_backend_transport_options")
        conn = dedicated_connection(self._client, client_name)
        self._batcher = _Batcher(conn, self.ttl_ms, self.format, self.timeout)
        self._listener = _Listener(dedicated_connection(self._client, client_name), url, self.timeout)

    def key(self, task_id: str) -> str:
        """The key (and channel) of ``task_id``'s state."""
        return f"{self.prefix}celery-task-meta-{task_id}"

    async def connect(self) -> None:
        await self._run("connect", self._batcher.ping())

    async def aclose(self) -> None:
        await self._listener.aclose()
        await self._batcher.aclose()
        await self._client.aclose()

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        await self._run("store", self._batcher.store(self.key(task_id), data))

    async def _get(self, task_id: str) -> bytes | None:
        data: bytes | None = await self._run("get", self._batcher.get(self.key(task_id)))
        return data

    async def _delete(self, task_id: str) -> None:
        await self._run("forget", self._batcher.delete(self.key(task_id)))

    async def _chord_join(
        self, group_id: str, index: int, size: int, data: bytes, ttl: float
    ) -> tuple[bool, bool, int | None, list[bytes] | None]:
        keys = self._chord_keys(group_id)
        command = ("EVAL", _CHORD, 2, *keys, index, data, size, max(1, int(ttl * 1000)), uuid.uuid4().hex)
        reply = await self._call("join a chord", command)
        if not reply[0]:
            return False, False, None, None
        return bool(reply[1]), bool(reply[2]), int(reply[3]), list(reply[4:])

    async def _chord_sent(self, group_id: str) -> None:
        await self._call("mark a chord sent", ("HSET", self._chord_keys(group_id)[1], "sent", "1"))

    def _chord_keys(self, group_id: str) -> tuple[str, str]:
        """The keys of a chord's join: the parts reported, and its flags."""
        return f"{self.prefix}chord-parts-{group_id}", f"{self.prefix}chord-{group_id}"

    async def _call(self, action: str, command: Command) -> Any:
        """One command, in the next round trip."""
        return await self._run(action, self._batcher.call(command))

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskMeta:
        """Wait until ``task_id`` is ready, woken by its channel; returns its state.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            OperationalError: Redis cannot be reached.
        """
        if timeout is not None and timeout <= 0:
            meta = await self.get(task_id)
            if meta.ready:
                return meta
            raise TimeoutError(f"The operation timed out waiting for task {task_id}.")
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self._wait(task_id)
        except builtins.TimeoutError:
            if not deadline.expired():
                raise
            raise TimeoutError(f"The operation timed out waiting for task {task_id}.") from None

    async def _wait(self, task_id: str) -> TaskMeta:
        read_first = self._found_ready >= 0.5
        if read_first:
            meta = await self.get(task_id)
            self._found(meta.ready)
            if meta.ready:
                return meta  # one round trip, no subscription
        async with self._listener.watch(self.key(task_id).encode()) as inbox:
            meta = await self.get(task_id)
            if not read_first:
                self._found(meta.ready)
            while not meta.ready:
                data = await inbox.get()
                if isinstance(data, OperationalError):
                    raise data
                meta = await self.get(task_id) if data is None else self._decode(data)
            return meta

    def _found(self, ready: bool) -> None:
        """Count one first read of a wait: whether the state was ready already."""
        self._found_ready += ((1.0 if ready else 0.0) - self._found_ready) / _FOUND_WINDOW

    def _decode(self, data: bytes) -> TaskMeta:
        return TaskMeta.from_dict(self.serializer.decode(data))

    async def _run(self, action: str, pending: asyncio.Future[Any]) -> Any:
        try:
            return await pending
        except RedisError as exc:
            url = mask_password(self.url)
            raise OperationalError(f"Redis result backend {url}: {action} failed: {exc}") from exc


class _Batcher:
    """Sends the reads and writes of one loop turn as at most three commands in one round trip.

    Stores go in one Lua call, deletes in one DEL, reads in one MGET; while a round trip is in
    flight the next batch gathers. One connection is enough: batches go one after the other.
    """

    def __init__(self, conn: AbstractConnection, ttl_ms: int, format: str, timeout: float) -> None:
        self.conn, self.ttl_ms, self.format, self.timeout = conn, ttl_ms, format, timeout
        self._stores: list[tuple[str, bytes, asyncio.Future[Any]]] = []
        self._deletes: list[tuple[str, asyncio.Future[Any]]] = []
        self._gets: list[tuple[str, asyncio.Future[Any]]] = []
        self._pings: list[asyncio.Future[Any]] = []
        self._calls: list[tuple[Command, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def store(self, key: str, data: bytes) -> asyncio.Future[Any]:
        future = self._future()
        self._stores.append((key, data, future))
        return future

    def get(self, key: str) -> asyncio.Future[Any]:
        future = self._future()
        self._gets.append((key, future))
        return future

    def delete(self, key: str) -> asyncio.Future[Any]:
        future = self._future()
        self._deletes.append((key, future))
        return future

    def ping(self) -> asyncio.Future[Any]:
        future = self._future()
        self._pings.append(future)
        return future

    def call(self, command: Command) -> asyncio.Future[Any]:
        """Any other command, in the next round trip; the future gets its reply."""
        future = self._future()
        self._calls.append((command, future))
        return future

    async def aclose(self) -> None:
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=30)
        await self.conn.disconnect()

    def _future(self) -> asyncio.Future[Any]:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return asyncio.get_running_loop().create_future()

    async def _flush(self) -> None:
        try:
            while self._stores or self._deletes or self._gets or self._pings or self._calls:
                batch = [self._take_stores(), self._take_deletes(), self._take_gets(), self._take_pings()]
                calls, self._calls = self._calls, []
                batch += [(command, functools.partial(_settle_one, future)) for command, future in calls]
                batch = [(command, settle) for command, settle in batch if command]
                await self._send(batch)
        finally:
            self._flusher = None

    async def _send(self, batch: list[tuple[Command, Callable[[Any], None]]]) -> None:
        replies: list[Any]
        try:
            async with asyncio.timeout(self.timeout):
                replies = await _round_trip(self.conn, [command for command, _ in batch])
        except RedisError as exc:
            replies = [exc] * len(batch)
        except builtins.TimeoutError:
            await self.conn.disconnect()
            replies = [RedisTimeoutError(f"no reply in {self.timeout} s")] * len(batch)
        for (_, settle), reply in zip(batch, replies, strict=True):
            settle(reply)

    def _take_stores(self) -> tuple[Command, Callable[[Any], None]]:
        stores, self._stores = self._stores[:_MAX_BATCH], self._stores[_MAX_BATCH:]
        keys = [key for key, _, _ in stores]
        command = (
            "EVAL",
            _STORE,
            len(keys),
            *keys,
            self.ttl_ms,
            self.format,
            *(data for _, data, _ in stores),
        )
        return (command if stores else ()), functools.partial(_settle, [f for *_, f in stores], None)

    def _take_deletes(self) -> tuple[Command, Callable[[Any], None]]:
        deletes, self._deletes = self._deletes[:_MAX_BATCH], self._deletes[_MAX_BATCH:]
        command = ("DEL", *(key for key, _ in deletes)) if deletes else ()
        return command, functools.partial(_settle, [f for _, f in deletes], None)

    def _take_gets(self) -> tuple[Command, Callable[[Any], None]]:
        gets, self._gets = self._gets[:_MAX_BATCH], self._gets[_MAX_BATCH:]
        command = ("MGET", *(key for key, _ in gets)) if gets else ()
        return command, functools.partial(_settle_each, [f for _, f in gets])

    def _take_pings(self) -> tuple[Command, Callable[[Any], None]]:
        pings, self._pings = self._pings, []
        return (("PING",) if pings else ()), functools.partial(_settle, pings, None)


def _settle(futures: list[asyncio.Future[Any]], result: Any, reply: Any) -> None:
    exc = reply if isinstance(reply, BaseException) else None
    for future in futures:
        _resolve(future, result, exc)


def _settle_one(future: asyncio.Future[Any], reply: Any) -> None:
    if isinstance(reply, BaseException):
        _resolve(future, exc=reply)
    else:
        _resolve(future, reply)


def _settle_each(futures: list[asyncio.Future[Any]], reply: Any) -> None:
    if isinstance(reply, BaseException):
        _settle(futures, None, reply)
        return
    for future, value in zip(futures, reply, strict=True):
        _resolve(future, value)


async def _round_trip(conn: AbstractConnection, commands: list[Command]) -> list[Any]:
    """Send ``commands`` at once and read their replies; an error reply is returned, not raised.

    A connection lost before the replies came is reconnected and the commands sent once more:
    they are all idempotent.
    """
    for attempt in (1, 2):
        try:
            return await exchange(conn, [pack(*command) for command in commands], len(commands))
        except _LOST:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _Inbox:
    """What one waiter receives, in order (an ``asyncio.Queue`` without the parts a waiter never uses)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[bytes | OperationalError | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: bytes | OperationalError | None) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> bytes | OperationalError | None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _Listener:
    """One pub/sub connection shared by every waiter of a backend."""

    def __init__(self, conn: AbstractConnection, url: str, timeout: float) -> None:
        self.conn, self.url, self.timeout = conn, url, timeout
        self._watchers: dict[bytes, set[_Inbox]] = {}
        self._subscribed: set[bytes] = set()
        self._dirty: set[bytes] = set()
        self._pong: asyncio.Future[None] | None = None
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._lock = asyncio.Lock()
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def watch(self, channel: bytes) -> AsyncIterator[_Inbox]:
        """Subscribe to ``channel`` for the block; entered once the subscription is in place.

        The inbox receives each message, ``None`` when a reconnection may have lost some, and an
        OperationalError when the backend is closed.
        """
        inbox = _Inbox()
        self._watchers.setdefault(channel, set()).add(inbox)
        try:
            if self._pong is None:
                self._pong = asyncio.get_running_loop().create_future()
            confirmed = self._pong
            self._changed(channel)
            await asyncio.shield(confirmed)
            yield inbox
        finally:
            watchers = self._watchers.get(channel, set())
            watchers.discard(inbox)
            if not watchers:
                self._watchers.pop(channel, None)
                self._changed(channel)

    async def aclose(self) -> None:
        tasks = [task for task in (self._sender, self._reader) if task is not None]
        self._sender = self._reader = None
        # Cancelled until they stop (redis-py can lose one cancellation), without swallowing our own.
        if await cancel_until_done(tasks, _STOP_TIMEOUT):
            logger.warning("Redis result backend: the result listener did not stop")
        closed = OperationalError("The result backend was closed while waiting for a result.")
        self._fail(closed)
        for inboxes in self._watchers.values():
            for inbox in inboxes:
                inbox.put_nowait(closed)
        self._subscribed.clear()
        await self.conn.disconnect()

    def _changed(self, channel: bytes) -> None:
        self._dirty.add(channel)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._dirty or self._pong is not None:
                async with self._lock:
                    if not await self._connected():
                        return  # the reader is reconnecting; it sends everything again after
                    commands = self._batch()
                    if commands:
                        await self.conn.send_packed_command(self.conn.pack_commands(commands), False)
        except (RedisError, OSError) as exc:
            if self._reader is None:
                self._fail(OperationalError(f"Redis result backend {mask_password(self.url)}: {exc}"))
        finally:
            self._sender = None

    async def _connected(self) -> bool:
        if self.conn.is_connected:
            return True
        if self._reader is not None:
            return False  # the reader reconnects
        if self._pong is None:
            self._dirty.clear()  # never subscribed: nothing to undo
            return False
        async with asyncio.timeout(self.timeout):
            await self.conn.connect()  # type: ignore[no-untyped-call]
        self._reader = asyncio.create_task(self._read_forever())
        return True

    def _batch(self) -> list[Command]:
        dirty, self._dirty = self._dirty, set()
        gone = [c for c in dirty if c not in self._watchers and c in self._subscribed]
        new = [c for c in dirty if c in self._watchers and c not in self._subscribed]
        self._subscribed.difference_update(gone)
        self._subscribed.update(new)
        commands: list[Command] = []
        if gone:
            commands.append(("UNSUBSCRIBE", *gone))
        if new:
            commands.append(("SUBSCRIBE", *new))
        if self._pong is not None:
            commands.append(("PING",))
            self._pongs.append(self._pong)
            self._pong = None
        return commands

    async def _read_forever(self) -> None:
        while True:
            try:
                reply = await self.conn.read_response()
            except _LOST as exc:
                async with self._lock:
                    await self._reconnect(exc)
                continue
            except RedisError as exc:
                logger.warning("Redis %s: unexpected pub/sub reply: %s", mask_password(self.url), exc)
                continue
            self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        kind = reply[0] if isinstance(reply, list) else reply
        if kind == b"message":
            for inbox in self._watchers.get(reply[1], ()):
                inbox.put_nowait(reply[2])
        elif kind in (b"pong", b"PONG", "PONG") and self._pongs:
            _resolve(self._pongs.popleft())

    async def _reconnect(self, exc: BaseException) -> None:
        url = mask_password(self.url)
        logger.warning("Redis %s: the pub/sub connection was lost (%s); reconnecting", url, exc)
        pause = 0.1
        while True:
            await self.conn.disconnect()
            try:
                async with asyncio.timeout(self.timeout):
                    await self.conn.connect()  # type: ignore[no-untyped-call]
                break
            except _LOST:  # TimeoutError included
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        logger.info("Redis %s: the pub/sub connection is back", url)
        self._subscribed.clear()
        self._dirty.update(self._watchers)
        stale, self._pongs = list(self._pongs), deque()
        if self._pong is None:
            self._pong = asyncio.get_running_loop().create_future()
        self._pong.add_done_callback(functools.partial(self._recovered, stale))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())

    def _recovered(self, stale: list[asyncio.Future[None]], confirmed: asyncio.Future[None]) -> None:
        """Once subscribed again: release the waiters of lost PINGs, make every waiter read again."""
        exc = None if confirmed.cancelled() else confirmed.exception()
        for future in stale:
            _resolve(future, exc=exc)
        for inboxes in self._watchers.values():
            for inbox in inboxes:
                inbox.put_nowait(None)

    def _fail(self, exc: BaseException) -> None:
        pending, self._pong = [*self._pongs, self._pong], None
        self._pongs.clear()
        for future in pending:
            if future is not None:
                _resolve(future, exc=exc)


def _resolve(future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
        future.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
