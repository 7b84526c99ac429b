"""redis://, rediss:// and sentinel:// — Redis Streams, one consumer group per queue.

Keys, with ``P`` the ``global_keyprefix`` option:

- ``P<queue>``: the queue's stream. An entry holds ``body``, ``content_type``, ``id`` and
  ``priority`` (carried, not used for ordering: a stream is first in, first out), plus
  ``redelivered`` once requeued or re-sent. Its consumer group, ``aqueue``, is created at id 0 by
  the first consumer, so entries published before any worker started are delivered.
- ``P<queue>.delayed``: a sorted set of the envelopes whose ``eta`` is still ahead (score = eta).
- ``P<queue>.dead``: the dead-letter stream: rejected entries, and entries delivered
  ``max_deliveries`` times without being settled. It is not trimmed. (So a queue must not be
  named like another queue's dead-letter stream.)
- ``P<channel>``: the pub/sub channel of ``broadcast``/``subscribe``.
- ``Paqueue.published.<broker id>.<n>``: the marker of a publish (see Publishing), short-lived.
- ``Paqueue.mark.<key>``: a mark of ``advance`` (beat's last due time sent for an entry); no expiry.
- Celery's exchanges (monitoring events, remote control) as kombu lays them out: see
  :mod:`aqueue.broker.redis_exchange`.

Delivery. Each consumer has a unique name in the group and reads with ``XREADGROUP ... BLOCK`` on
a connection of its own, so the blocking read never holds a pooled connection. What it reads is
pending for it in the group until settled:

- ack is ``XACK`` + ``XDEL`` (streams do not grow); the acks of one loop turn go out in one
  round trip, and acks arriving while it is in flight go in the next one. Acks made in the loop
  turn before the consumer's next read (a run acknowledging the delivery just handed out) go in
  that read's write, ahead of its ``XREADGROUP``;
- reject copies the entry to the dead-letter stream, requeue re-adds it to its stream marked
  ``redelivered``; either way the original is acknowledged and deleted, in one Lua script;
- a settle that fails (an outage) keeps the entry held and marked: the consumer keeps renewing it,
  and once Redis answers again gives it back to its stream marked ``redelivered``, so the worker
  checks whether its task already finished (an ack lost that way never makes a task run twice);
- every ``visibility_timeout / 3`` a live consumer resets the idle time of everything it holds
  (``XCLAIM ... JUSTID``, which leaves the delivery count alone), so a long task is never
  reclaimed while its worker lives;
- at start and then every ``visibility_timeout / 2`` (at most 5 s), a consumer claims the entries
  other consumers have left idle past ``visibility_timeout`` and delivers them with
  ``redelivered=True``; an entry already delivered ``max_deliveries`` times goes to the
  dead-letter stream instead. This is ``XPENDING ... IDLE`` + ``XCLAIM`` in one Lua script rather
  than ``XAUTOCLAIM``, which does not report delivery counts: the count is checked and the entry
  claimed or dead-lettered in one atomic step. (A requeued entry is a new entry: its count starts
  again.) Consumers that hold nothing and stayed idle an hour are dropped from the group.

A worker that stalls past the timeout (a blocked event loop) may see another claim its entries:
delivery is at least once, as with every broker.

Unreadable entries. Any field of an entry may be garbage (written by hand, or by another program). An
entry without a ``body`` or a ``content_type``, or whose ``id`` or ``content_type`` is not UTF-8,
becomes no delivery: the consumer moves it to the dead-letter stream as it is and logs it once, by its
stream id. This is checked on the slow path only: the fast path decodes inside a ``try``.

Publishing. A publish is one write of ``XADD`` (``ZADD`` for a delayed envelope), which ends by
setting a marker key of its own (expiring a few seconds later). redis-py's silent retries are off
for this broker's connections: a command whose reply was lost may have been applied, and sending it
again would store a batch twice. When the reply of a publish is lost, the marker says whether the
batch was applied (Redis runs one connection's commands in order): if it is set, the publish has
succeeded; if not, it fails, and a retry by the publisher marks the envelopes ``resent``. A resent
entry carries ``redelivered``, so the worker runs it only when its task is neither running nor
finished. (A delayed envelope goes to the sorted set unmarked: the same member twice is one member.)

ETA. ``publish`` puts an envelope whose ``eta`` is ahead in the sorted set; consumers move due
ones to the stream (Lua, atomic) at least every 0.5 s while fetching, and their blocking reads
end by then. A due message thus waits at most about 0.5 s once a consumer of its queue has room.

Connections (redis.asyncio, RESP2, hiredis when installed): one connection per broker for publishes
and acks, whose round trips go one after another (what comes while one is in flight goes in the next
write: :class:`aqueue._redis.Line`, which spares the hot path redis-py's pool and pipelines); one
bounded pool, ``max_connections`` (default 20) connections shared by renewals, scripts and the rest,
waiting up to 20 s for a free one; plus one connection per open consumer and one per open
``subscribe``. A reply is awaited at most ``socket_timeout`` (default 10 s), under
``asyncio.timeout`` rather than redis-py's own socket timeout (see :mod:`aqueue._redis`). Redis errors become
:class:`~aqueue.exceptions.OperationalError`. A consumer whose connection drops logs once,
reconnects with backoff (0.1 s doubling to 1 s) and goes on; entries whose reply was lost (read
for it by the server, never received) are given back to the stream.

The hot path: the blocking read is sent and parsed by hand on the consumer's own connection
(hiredis lists, a fixed field order checked with two comparisons, content types decoded once),
one ``Delivery`` per entry and nothing else per message; acks are grouped per stream into one
``XACK`` and one ``XDEL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import itertools
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqueue._redis import CLIENT_OPTIONS, Line, dedicated_connection, pack, read_replies, redis_client
from aqueue._tasks import cancel_until_done
from aqueue.broker.base import Broker, Consumer, Delivery
from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener
from aqueue.exceptions import ImproperlyConfigured, OperationalError
from aqueue.message import Envelope
from aqueue.rates import Rate
from aqueue.urls import mask_password, parse

if TYPE_CHECKING:
    from aqueue.broker.redis_exchange import RedisExchanges

__all__ = ["RedisBroker"]

logger = logging.getLogger("aqueue.broker.redis")

GROUP = "aqueue"
_BLOCK = 1.0
_ETA_POLL = 0.5
_CHUNK = 500
_RESENT = (b"redelivered", b"1")
"""Marks an entry that is a redelivery, or a re-sent copy that may already have been stored."""
_CACHED_CONTENT_TYPES = 64
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
_STOP_TIMEOUT = 5.0
"""Longest wait for a consumer's background tasks to stop when it closes."""
_SCRIPTS = ("reclaim", "settle", "move_due", "purge", "leave", "take_token", "advance", "bind")
_LUA = {name: (Path(__file__).parent / f"redis_{name}.lua").read_text() for name in _SCRIPTS}
_OWN_OPTIONS = ("visibility_timeout", "global_keyprefix", "max_deliveries", "max_connections")
# Celery transport options that mean nothing here; accepted so that a Celery config works as is
# (queue_order_strategy: a consumer reads all its streams in one XREADGROUP).
_CELERY_ONLY = ("fanout_prefix", "fanout_patterns", "priority_steps", "queue_order_strategy", "sep")


class RedisBroker(Broker):
    """A broker keeping each queue in a Redis stream.

    Parameters:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS, or
            ``sentinel://host:port;sentinel://host:port[/db]`` (see :mod:`aqueue._redis`).
        visibility_timeout: seconds an unsettled delivery of a silent consumer stays claimed.
        global_keyprefix: prepended to every key and channel name.
        max_deliveries: deliveries of one entry before it is dead-lettered instead.
        max_connections: size of the shared connection pool.
        options: ``socket_timeout`` (longest wait for a reply, default 10 s),
            ``socket_connect_timeout``, ``socket_keepalive``, ``health_check_interval``,
            ``client_name`` (passed to the connections); with Sentinel ``master_name`` (required),
            ``sentinel_kwargs``, ``min_other_sentinels``.

    Raises:
        InvalidURL: the URL is not a usable redis URL.
        ImproperlyConfigured: an unknown option (naming the closest known one) or a bad value.
    """

    def __init__(
        self,
        url: str,
        *,
        visibility_timeout: float = 30.0,
        global_keyprefix: str = "",
        max_deliveries: int = 10,
        max_connections: int = 20,
        **options: Any,
    ) -> None:
        parse(url, kinds=self.schemes, role="broker")
        _check_positive(visibility_timeout=visibility_timeout, max_deliveries=max_deliveries)
        _check_positive(max_connections=max_connections)
        self.url, self.prefix = url, global_keyprefix
        self.visibility_timeout, self.max_deliveries = float(visibility_timeout), int(max_deliveries)
        self.client_name = str(options.get("client_name") or "aqueue")
        self.command_timeout = float(options.pop("socket_timeout", None) or 10.0)
        self._client = self._open(url, dict(_connection_options(options), max_connections=max_connections))
        self._scripts = {name: self._client.register_script(source) for name, source in _LUA.items()}
        self._consumers: set[_RedisConsumer] = set()
        self._marker = f"{global_keyprefix}aqueue.published.{uuid.uuid4().hex}."
        self._marker_ms = int((self.command_timeout + 5) * 1000)
        self._batches = itertools.count()
        self._line = Line(self._connection(self.client_name), self.command_timeout)
        """Publishes and acks: one connection, round trips one after another (see aqueue._redis)."""

    schemes: tuple[str, ...] = ("redis", "rediss", "sentinel")

    def _open(self, url: str, options: dict[str, Any]) -> aioredis.Redis:
        """The client (and ``self.db``, the database number) for ``url``."""
        # No silent retries: a command whose reply was lost may have been applied (a publish would be
        # stored twice, a claim lost); every caller handles the failure itself.
        client = redis_client(url, options, retry=Retry(NoBackoff(), 0))
        self.db = int(client.connection_pool.connection_kwargs.get("db") or 0)
        return client

    def stream_key(self, queue: str) -> str:
        """The key of ``queue``'s stream; its other keys are this plus a suffix."""
        return f"{self.prefix}{queue}"

    def dead_key(self, queue: str) -> str:
        """The key of ``queue``'s dead-letter stream."""
        return f"{self.stream_key(queue)}.dead"

    def delayed_key(self, queue: str) -> str:
        """The key of the sorted set holding ``queue``'s envelopes with an eta ahead."""
        return f"{self.stream_key(queue)}.delayed"

    async def connect(self) -> None:
        async with self._errors("connect"):
            await self._client.ping()
            await self._line.connect()

    async def aclose(self) -> None:
        for consumer in list(self._consumers):
            await consumer._shutdown()
        await self._line.aclose()
        await self._client.aclose()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        now = time.time()
        await self._send_marked([self._publish_command(e, now) for e in envelopes], len(envelopes))

    async def _send_marked(self, commands: list[bytes], count: int) -> None:
        """Send ``commands``, a publish of ``count`` envelopes, then set a marker that says if a lost reply landed."""
        marker = f"{self._marker}{next(self._batches)}"
        commands = [*commands, pack(b"SET", marker, b"", b"PX", self._marker_ms)]
        # No timeout of its own here: the line waits for a reply at most command_timeout seconds.
        try:
            _raise_first_error(await self._line.send(b"".join(commands), len(commands)))
        except _LOST as exc:  # TimeoutError included
            if not await self._landed(marker):
                raise self._failed("publish", exc) from exc
            logger.warning(
                "Redis broker %s: the reply to a publish of %d message(s) was lost (%s), but they "
                "were stored: not sending them again",
                mask_password(self.url), count, exc,
            )  # fmt: skip
        except RedisError as exc:
            raise self._failed("publish", exc) from exc

    def _publish_command(self, e: Envelope, now: float) -> bytes:
        fields = (b"body", e.body, b"content_type", e.content_type, b"id", e.id, b"priority")
        priority = b"" if e.priority is None else e.priority
        if e.eta is not None and e.eta > now:
            # The same member again if this is a retry: a sorted set keeps one.
            return pack(b"ZADD", self.delayed_key(e.queue), e.eta, _pack(*fields, priority))
        if e.resent:
            return pack(b"XADD", self.stream_key(e.queue), b"*", *fields, priority, *_RESENT)
        return pack(b"XADD", self.stream_key(e.queue), b"*", *fields, priority)

    async def _landed(self, marker: str) -> bool:
        """Whether the batch whose last command set ``marker`` was applied (its reply was lost)."""
        try:
            async with asyncio.timeout(self.command_timeout):
                return bool(await self._client.exists(marker))
        except _LOST:
            return False

    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return _RedisConsumer(self, queues, prefetch)

    async def purge(self, queue: str) -> int:
        keys = [self.stream_key(queue), self.delayed_key(queue)]
        async with self._errors("purge"):
            return int(await self._scripts["purge"](keys=keys, args=[GROUP]))

    async def take_token(self, key: str, rate: Rate) -> float:
        """One token of the bucket ``key`` that every worker on this Redis shares (atomic, in Lua)."""
        async with self._errors("take a rate-limit token"):
            wait = await self._scripts["take_token"](
                keys=[f"{self.prefix}aqueue.rate.{key}"], args=[rate.per_second, 1]
            )
        return float(wait)

    async def advance(self, key: str, value: float) -> float | None:
        """Raise the mark ``key`` that every process on this Redis shares (atomic, in Lua)."""
        async with self._errors("keep a beat mark"):
            previous = await self._scripts["advance"](
                keys=[f"{self.prefix}aqueue.mark.{key}"], args=[repr(value)]
            )
        return None if previous is None else float(previous)

    async def dead_letters(self, queue: str) -> list[Envelope]:
        """The envelopes in ``queue``'s dead-letter stream, oldest first."""
        async with self._errors("read dead letters"):
            entries = await self._client.xrange(self.dead_key(queue))
        return [_envelope(queue, fields or {}) for _, fields in entries or ()]

    async def broadcast(self, channel: str, data: bytes) -> None:
        async with self._errors("broadcast"):
            await self._client.publish(self.prefix + channel, data)

    def subscribe(self, channel: str) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._listen(self.prefix + channel)

    async def send_to_exchange(self, exchange: Exchange, message: ExchangeMessage) -> None:
        await self._exchanges.send(exchange, message)

    def bind_exchange(
        self, exchange: Exchange, listener: Listener
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[ExchangeMessage]]:
        return self._exchanges.bind(exchange, listener)

    @functools.cached_property
    def _exchanges(self) -> RedisExchanges:
        from aqueue.broker.redis_exchange import RedisExchanges

        return RedisExchanges(self)

    @asynccontextmanager
    async def _listen(self, channel: str, *, pattern: bool = False) -> AsyncIterator[AsyncIterator[bytes]]:
        """What is published on ``channel`` (a glob-style pattern of channels with ``pattern``)."""
        conn = self._connection(self.client_name)
        name, command = channel.encode(), "PSUBSCRIBE" if pattern else "SUBSCRIBE"
        try:
            async with self._errors("subscribe"):
                await _subscribe(conn, name, command)
            yield self._messages(conn, name, command)
        finally:
            await conn.disconnect()

    async def _messages(self, conn: AbstractConnection, channel: bytes, command: str) -> AsyncIterator[bytes]:
        backoff = _Backoff(f"subscriber of {channel.decode(errors='replace')}", self.url)
        while True:
            try:
                reply = await conn.read_response()
            except _LOST as exc:
                await backoff.lost(conn, exc)
                with contextlib.suppress(*_LOST):  # TimeoutError included
                    async with asyncio.timeout(self.command_timeout):
                        await _subscribe(conn, channel, command)
                continue
            except RedisError as exc:
                raise OperationalError(f"Redis broker {mask_password(self.url)}: subscriber: {exc}") from exc
            backoff.ok()
            if isinstance(reply, list) and reply[0] in (b"message", b"pmessage"):
                yield reply[-1]

    def _connection(self, name: str) -> AbstractConnection:
        return dedicated_connection(self._client, name)

    @contextlib.asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.command_timeout):
                yield
        except (RedisError, TimeoutError) as exc:
            raise self._failed(action, exc) from exc

    def _failed(self, action: str, exc: BaseException) -> OperationalError:
        return OperationalError(
            f"Redis broker {mask_password(self.url)}: {action} failed: {type(exc).__name__}: {_text(exc)}"
        )


class _RedisConsumer(Consumer):
    def __init__(self, broker: RedisBroker, queues: Sequence[str], prefetch: int) -> None:
        super().__init__(queues, prefetch)
        self.broker, self.client, self.scripts = broker, broker._client, broker._scripts
        host = re.sub(r"[^\w.-]", "_", socket.gethostname())
        self.name = f"aqueue-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.keys = [broker.stream_key(q).encode() for q in self.queues]
        self._queue_of = dict(zip(self.keys, self.queues, strict=True))
        self._key_of = dict(zip(self.queues, self.keys, strict=True))
        self._owned: dict[bytes, set[bytes]] = {key: set() for key in self.keys}
        self._marked: dict[bytes, set[bytes]] = {key: set() for key in self.keys}
        """Owned entries whose settle failed: kept (and renewed) until recovery gives them back redelivered."""
        self._unreadable: list[tuple[bytes, bytes, str]] = []
        """Entries read whose fields cannot be used (stream key, entry id, why), to be dead-lettered."""
        self._overflow: list[Delivery] = []
        self._content_types: dict[bytes, str] = {}
        self._conn = broker._connection(self.name)
        self._backoff = _Backoff(f"consumer {self.name}", broker.url)
        vt = broker.visibility_timeout
        self._reclaim_every = min(5.0, max(0.05, vt / 2))
        self._started = self._stranded = False
        self._next_reclaim = self._next_eta = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._acks: tuple[dict[bytes, list[bytes]], list[asyncio.Future[None]]] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._reading = False
        """Between deciding to read and writing the read: acks then go in the same write."""

    async def _fetch(self, n: int) -> Sequence[Delivery]:
        if self._overflow:
            return self._take(n, [])
        try:
            async with asyncio.timeout(self.broker.command_timeout + _BLOCK):
                if not self._started:
                    await self._start()
                if self._stranded or any(self._marked.values()):
                    await self._recover()
                out = await self._poll(n)
        except _LOST as exc:  # TimeoutError included
            await self._backoff.lost(self._conn, exc)
            return []
        except ResponseError as exc:
            if not _gone(exc):
                raise self._error("fetch", exc) from exc
            self._started = False  # the stream was deleted: create the group again
            return []
        except RedisError as exc:
            raise self._error("fetch", exc) from exc
        self._backoff.ok()
        if self._unreadable:
            await self._reject_unreadable()
        return self._take(n, out)

    def _take(self, n: int, fetched: list[Delivery]) -> list[Delivery]:
        out = self._overflow + fetched if self._overflow else fetched
        self._overflow = out[n:]
        return out[:n]

    async def _start(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key in self.keys:
                pipe.execute_command("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM")
            for result in await pipe.execute(raise_on_error=False):
                if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                    raise result
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever())
        self.broker._consumers.add(self)
        self._started = True

    async def _poll(self, n: int) -> list[Delivery]:
        now = time.monotonic()
        self._stranded = True  # until the replies are in: entries claimed by a lost reply are ours
        self._unreadable.clear()  # any left by a failed poll are given back by the recovery
        out: list[Delivery] = []
        if now >= self._next_reclaim:
            self._next_reclaim = now + self._reclaim_every
            out = await self._reclaim(n)
        if now >= self._next_eta:
            await self._move_due(now)
        if not out:
            out = await self._read(n, min(_BLOCK, self._next_eta - now, self._next_reclaim - now))
        self._stranded = False
        return out

    async def _read(self, n: int, block: float) -> list[Delivery]:
        conn = self._conn
        # One loop turn first: the runs just handed out ack in it, and those acks go in this write.
        self._reading = True
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._reading = False
            if self._acks is not None and self._flusher is None:
                self._flusher = asyncio.create_task(self._flush_acks())
            raise
        self._reading = False
        acks, self._acks = self._acks, None
        commands = self._ack_commands(acks[0]) if acks is not None else []
        commands.append(
            pack(
                b"XREADGROUP", b"GROUP", GROUP, self.name, b"COUNT", n, b"BLOCK", max(1, int(block * 1000)),
                b"STREAMS", *self.keys, *(b">" for _ in self.keys),
            )
        )  # fmt: skip
        try:
            await conn.send_packed_command(b"".join(commands))
            if acks is not None:
                self._acks_done(*acks, await read_replies(conn, len(commands) - 1))
        except BaseException as exc:
            if acks is not None:
                self._acks_done(*acks, exc)
            raise
        reply = await conn.read_response()
        if not reply:
            return []
        if len(reply) == 1:
            return self._deliveries(reply[0][0], reply[0][1], False)
        return [d for key, entries in reply for d in self._deliveries(key, entries, False)]

    def _deliveries(self, key: bytes, entries: list[Any], redelivered: bool) -> list[Delivery]:
        queue, owned, content_types = self._queue_of[key], self._owned[key], self._content_types
        out: list[Delivery] = []
        for entry_id, f in entries:
            if not f:
                continue  # deleted while pending
            try:
                if len(f) == 8 and f[0] == b"body" and f[4] == b"id":
                    body, ctype, task_id, again = f[1], f[3], f[5], redelivered
                else:
                    body, ctype, task_id, again = _fields(entry_id, f, redelivered)
                content_type = content_types.get(ctype) or self._content_type(ctype)
                out.append(Delivery(self, task_id.decode(), queue, body, content_type, again, entry_id))
            except (UnicodeDecodeError, LookupError):
                self._unreadable.append((key, entry_id, _unreadable(f)))
                continue
            owned.add(entry_id)
        return out

    def _content_type(self, raw: bytes) -> str:
        decoded = raw.decode()
        if len(self._content_types) < _CACHED_CONTENT_TYPES:  # garbage must not grow the cache
            self._content_types[raw] = decoded
        return decoded

    async def _reject_unreadable(self) -> None:
        """Dead-letter the entries that cannot become deliveries; they are logged once, by stream id."""
        unreadable, self._unreadable = self._unreadable, []
        try:
            for key, entry_id, why in unreadable:
                queue = self._queue_of[key]
                async with asyncio.timeout(self.broker.command_timeout):
                    await self.scripts["settle"](
                        keys=[key, self.broker.dead_key(queue)], args=[GROUP, "", entry_id]
                    )
                logger.error(
                    "Rejecting unreadable entry %s of queue %r: %s. It was not run and has been dead-lettered.",
                    entry_id.decode(), queue, why,
                )  # fmt: skip
        except (RedisError, TimeoutError) as exc:
            # Still pending here and not owned: the recovery gives them back, and they are read again.
            self._stranded = True
            logger.debug("Dead-lettering unreadable entries failed: %s", exc)

    async def _reclaim(self, n: int) -> list[Delivery]:
        broker, out = self.broker, list[Delivery]()
        idle_ms = int(broker.visibility_timeout * 1000)
        forget_ms = int(max(3600.0, 10 * broker.visibility_timeout) * 1000)
        for key, queue in self._queue_of.items():
            if len(out) >= n:
                break
            count = min(n - len(out), _CHUNK)  # Lua's unpack() takes a few thousand values at most
            args: list[str | int] = [GROUP, self.name, idle_ms, count, broker.max_deliveries, forget_ms]
            entries = await self.scripts["reclaim"](keys=[key, broker.dead_key(queue)], args=args)
            out += self._deliveries(key, entries, True)
        return out

    async def _move_due(self, now: float) -> None:
        self._next_eta = now + _ETA_POLL
        for key, queue in self._queue_of.items():
            keys: list[str | bytes] = [self.broker.delayed_key(queue), key]
            moved, next_due = await self.scripts["move_due"](keys=keys, args=[time.time(), _CHUNK])
            if moved >= _CHUNK:
                self._next_eta = now
            elif next_due is not None:
                self._next_eta = min(self._next_eta, now + max(0.0, float(next_due) - time.time()))

    async def _recover(self) -> None:
        """Give back to their streams the entries pending for this consumer that it does not own, and
        those whose settle failed (marked redelivered: the worker checks whether they already ran)."""
        for key, owned in self._owned.items():
            marked = list(self._marked[key])
            for i in range(0, len(marked), _CHUNK):
                chunk = marked[i : i + _CHUNK]
                await self.scripts["settle"](keys=[key, key], args=[GROUP, "1", *chunk])
                owned.difference_update(chunk)
                self._marked[key].difference_update(chunk)
            try:
                pending = await self.client.xpending_range(key, GROUP, "-", "+", 10_000, self.name)
            except ResponseError as exc:
                if _gone(exc):
                    continue  # the stream was deleted, and what was pending with it
                raise
            lost = [p["message_id"] for p in pending if p["message_id"] not in owned]
            for i in range(0, len(lost), _CHUNK):
                await self.scripts["settle"](keys=[key, key], args=[GROUP, "", *lost[i : i + _CHUNK]])
        self._stranded = False

    async def _renew_forever(self) -> None:
        await renew_forever(
            self.name, self.broker.visibility_timeout / 3, self.broker.command_timeout, self._renew
        )

    async def _renew(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, owned in self._owned.items():
                ids: list[int | bytes | str | memoryview[int]] = list(owned)
                for i in range(0, len(ids), _CHUNK):
                    pipe.xclaim(key, GROUP, self.name, 0, ids[i : i + _CHUNK], justid=True)
            if len(pipe):
                await pipe.execute()

    async def _ack(self, delivery: Delivery) -> None:
        if self._acks is None:
            self._acks = ({}, [])
            if self._flusher is None and not self._reading:  # else they go with the next read
                self._flusher = asyncio.create_task(self._flush_acks())
        ids, waiters = self._acks
        ids.setdefault(self._key_of[delivery.queue], []).append(delivery.tag)
        # A future per ack rather than one shared and shielded: cancelling a waiter cancels its own only.
        done = asyncio.get_running_loop().create_future()
        waiters.append(done)
        await done

    async def _flush_acks(self) -> None:
        try:
            while self._acks is not None:
                (ids, waiters), self._acks = self._acks, None
                try:
                    replies = await self._send_acks(ids)
                except (RedisError, TimeoutError) as exc:
                    self._acks_done(ids, waiters, exc)
                else:
                    self._acks_done(ids, waiters, replies)
        finally:
            self._flusher = None

    async def _send_acks(self, ids: dict[bytes, list[bytes]]) -> list[Any]:
        commands = self._ack_commands(ids)
        # The line waits for a reply at most command_timeout seconds.
        return await self.broker._line.send(b"".join(commands), len(commands))

    def _ack_commands(self, ids: dict[bytes, list[bytes]]) -> list[bytes]:
        commands = []
        for key, entry_ids in ids.items():
            commands += [pack(b"XACK", key, GROUP, *entry_ids), pack(b"XDEL", key, *entry_ids)]
        return commands

    def _acks_done(
        self,
        ids: dict[bytes, list[bytes]],
        waiters: list[asyncio.Future[None]],
        outcome: list[Any] | BaseException,
    ) -> None:
        """Settle the waiters of acks sent: ``outcome`` is the replies, or why there are none."""
        if isinstance(outcome, BaseException):
            failure: BaseException | None = outcome
        else:
            failure = next((reply for reply in outcome if isinstance(reply, ResponseError)), None)
        if failure is not None:
            for key, entry_ids in ids.items():
                self._marked[key].update(entry_ids)
            exc = self._error("ack", failure)
            for done in waiters:
                if not done.done():
                    done.set_exception(exc)
                    done.add_done_callback(_retrieved)
            return
        for key, entry_ids in ids.items():
            self._owned[key].difference_update(entry_ids)
        for done in waiters:
            if not done.done():
                done.set_result(None)

    async def _reject(self, delivery: Delivery) -> None:
        await self._settle(delivery, self.broker.dead_key(delivery.queue), "")

    async def _requeue(self, delivery: Delivery) -> None:
        await self._settle(delivery, self.broker.stream_key(delivery.queue), "1")

    async def _settle(self, delivery: Delivery, target: str, mark: str) -> None:
        key = self._key_of[delivery.queue]
        try:
            async with asyncio.timeout(self.broker.command_timeout):
                await self.scripts["settle"](keys=[key, target], args=[GROUP, mark, delivery.tag])
        except (RedisError, TimeoutError) as exc:
            self._marked[key].add(delivery.tag)
            raise self._error("settle", exc) from exc
        self._owned[key].discard(delivery.tag)

    async def aclose(self) -> None:
        """Stop consuming: give back what was fetched and not handed out, leave the group if idle."""
        try:
            await super().aclose()
            for delivery in self._overflow:
                self._owned[self._key_of[delivery.queue]].discard(delivery.tag)
            self._overflow = []
            if self._started:
                async with asyncio.timeout(self.broker.command_timeout):
                    await self._recover()
                    for key in self.keys:  # one by one: on a cluster, each queue has a slot of its own
                        await self.scripts["leave"](keys=[key], args=[GROUP, self.name])
        except (RedisError, TimeoutError) as exc:
            raise self._error("close", exc) from exc
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.broker._consumers.discard(self)
        renewer, self._renewer = self._renewer, None
        if renewer is not None and await cancel_until_done([renewer], _STOP_TIMEOUT):
            logger.warning("Redis broker: the claim renewer of consumer %s did not stop", self.name)
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=_BLOCK + 10)
        self._started = False
        await self._conn.disconnect()

    def _error(self, action: str, exc: BaseException) -> OperationalError:
        url = mask_password(self.broker.url)
        return OperationalError(f"Redis broker {url}: {action} failed for consumer {self.name}: {_text(exc)}")


class _Backoff:
    """Reconnection pauses for one connection, logging once per outage."""

    def __init__(self, what: str, url: str) -> None:
        self.what, self.url, self.pause, self.down = what, url, 0.1, False

    async def lost(self, conn: AbstractConnection, exc: BaseException) -> None:
        await conn.disconnect()
        if not self.down:
            self.down = True
            logger.warning(
                "Redis %s: the connection of %s was lost (%s); reconnecting",
                mask_password(self.url), self.what, _text(exc),
            )  # fmt: skip
        await asyncio.sleep(self.pause)
        self.pause = min(self.pause * 2, 1.0)

    def ok(self) -> None:
        if self.down:
            logger.info("Redis %s: %s reconnected", mask_password(self.url), self.what)
            self.down, self.pause = False, 0.1


async def _subscribe(conn: AbstractConnection, channel: bytes, command: str = "SUBSCRIBE") -> None:
    await conn.send_command(command, channel)
    await conn.read_response()


async def renew_forever(
    name: str, every: float, timeout: float, renew: Callable[[], Awaitable[None]]
) -> None:
    """Call ``renew`` every ``every`` seconds, each call bounded by ``timeout``; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(every)
        try:
            async with asyncio.timeout(timeout):
                await renew()
        except (RedisError, TimeoutError) as exc:
            logger.debug("Renewing the claims of %s failed: %s", name, exc)


def _connection_options(options: dict[str, Any]) -> dict[str, Any]:
    known = sorted({*_OWN_OPTIONS, *CLIENT_OPTIONS, *_CELERY_ONLY})
    for name in options:
        if name not in known:
            closest = difflib.get_close_matches(name, known, n=1, cutoff=0.0)[0]
            raise ImproperlyConfigured(
                f"Unknown Redis broker option {name!r}. Did you mean {closest!r}? "
                f"Known options: {', '.join(sorted(known))}."
            )
    return {name: value for name, value in options.items() if name in CLIENT_OPTIONS}


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, int | float) or value <= 0:
            raise ImproperlyConfigured(
                f"The Redis broker option {name} must be a positive number, not {value!r}."
            )


def _pack(*values: bytes | str | int) -> bytes:
    encoded = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return b"".join(b"%d:%s" % (len(v), v) for v in encoded)


def _envelope(queue: str, fields: Mapping[Any, Any]) -> Envelope:
    """The envelope of a dead letter; it may be an unreadable entry, so nothing here raises."""
    priority = fields.get(b"priority", b"")
    return Envelope(
        fields.get(b"id", b"").decode(errors="backslashreplace"),
        queue,
        fields.get(b"body", b""),
        fields.get(b"content_type", b"").decode(errors="backslashreplace"),
        None,
        int(priority) if priority.isdigit() else None,
    )


def _gone(exc: ResponseError) -> bool:
    """Whether ``exc`` says the stream or its group was deleted (or the database flushed)."""
    return "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a timeout says nothing by itself


def _raise_first_error(replies: list[Any]) -> None:
    """Raise the first error reply of a round trip, as a pipeline does."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _fields(entry_id: bytes, f: list[bytes], redelivered: bool) -> tuple[bytes, bytes, bytes, bool]:
    """Body, content type, id and redelivered flag of an entry in another field order (or incomplete).

    Raises:
        LookupError: the entry has no body or no content type.
    """
    d = dict(zip(f[::2], f[1::2], strict=False))
    return d[b"body"], d[b"content_type"], d.get(b"id", entry_id), redelivered or b"redelivered" in d


def _unreadable(f: list[bytes]) -> str:
    """Why an entry's fields cannot make a delivery, for the log."""
    d = dict(zip(f[::2], f[1::2], strict=False))
    for name in (b"body", b"content_type"):
        if name not in d:
            return f"it has no {name.decode()} field"
    for name in (b"id", b"content_type"):
        value = d.get(name, b"")
        try:
            value.decode()
        except UnicodeDecodeError:
            return f"its {name.decode()} field is not UTF-8 text ({value[:40]!r})"
    return "its fields cannot be read"
