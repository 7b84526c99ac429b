"""The one place Redis clients are made: a URL and transport options in, a redis.asyncio client out.

Every Redis user (brokers, the result backend, and through them rate limits, remote control, events
and chords) calls :func:`redis_client`, so each of them understands the same URLs:

- ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://`` (TLS): one server;
- ``sentinel://[[user]:password@]host[:port][/db]``, several joined by ``;`` as in Celery and kombu
  (``sentinel://h1:26379;sentinel://h2:26379/0``): the master that Redis Sentinel names, with the
  ``master_name`` option (required), ``sentinel_kwargs`` and ``min_other_sentinels``; see
  :mod:`aqueue._sentinel`, and how a failover is followed.

The client has a bounded pool (``max_connections``, default 20, waiting up to 20 s for a free
connection); :func:`dedicated_connection` makes a connection outside it (blocking reads, pub/sub) that
reaches the same server the same way.

Round trips by hand. redis-py's pipelines and pool cost more CPU per round trip than the rest of a
publish or an ack (a condition and a timeout to take a pooled connection, a health check, a command
stack, observability hooks). The hot paths instead pack their commands here (:func:`pack`) and send
them on a :class:`Line`, one connection whose round trips go one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import DataError, ResponseError

from aqueue.exceptions import InvalidURL
from aqueue.urls import mask_password

__all__ = [
    "CLIENT_OPTIONS",
    "Line",
    "cluster_client",
    "connection_kwargs",
    "dedicated_connection",
    "exchange",
    "node_connection",
    "pack",
    "read_replies",
    "redis_client",
    "seed_kwargs",
]

CONNECTION_OPTIONS: tuple[str, ...] = ("socket_timeout", "socket_connect_timeout", "socket_keepalive")
CONNECTION_OPTIONS += ("health_check_interval", "client_name")
SENTINEL_OPTIONS = ("master_name", "sentinel_kwargs", "min_other_sentinels")
CLIENT_OPTIONS = (*CONNECTION_OPTIONS, *SENTINEL_OPTIONS, "max_connections")
"""The transport options :func:`redis_client` reads; a caller checks the others against its own."""


def redis_client(
    url: str,
    options: Mapping[str, Any] | None = None,
    *,
    retry: Retry | None = None,
    setting: str = "broker_transport_options",
) -> aioredis.Redis:
    """A client of the Redis server (or the Sentinel-managed master) that ``url`` names.

    Parameters:
        url: a ``redis://``, ``rediss://`` or ``sentinel://`` URL (see the module docstring).
        options: transport options; the names in :data:`CLIENT_OPTIONS` are used, the others ignored.
        retry: redis-py's retry policy for the connections (default: 3 retries with backoff).
        setting: the setting ``options`` come from, named in errors.

    Raises:
        InvalidURL: the URL does not parse, or its path is not a database number.
        ImproperlyConfigured: a ``sentinel://`` URL without the ``master_name`` option.
    """
    options = dict(options or {})
    max_connections = int(options.get("max_connections") or 20)
    wanted = {name: options[name] for name in CONNECTION_OPTIONS if name in options}
    if retry is not None:
        wanted["retry"] = retry
    if urlsplit(url).scheme != "sentinel":
        pool = BlockingConnectionPool(
            max_connections=max_connections, timeout=20, **connection_kwargs(url, **wanted)
        )
        return aioredis.Redis.from_pool(pool)
    from aqueue._sentinel import sentinel_client

    return sentinel_client(url, options, wanted, max_connections=max_connections, setting=setting)


def cluster_client(
    url: str, options: Mapping[str, Any] | None = None, *, retry: Retry | None = None
) -> RedisCluster:
    """A client of the Redis Cluster that ``redis+cluster://[[user]:password@]host[:port]`` names (a seed node).

    ``options`` are read as by :func:`redis_client` (``max_connections`` is per node).

    Raises:
        InvalidURL: the URL does not parse, or it names a database other than 0 (a cluster has one).
    """
    options = dict(options or {})
    wanted = {name: options[name] for name in CONNECTION_OPTIONS if name in options}
    if retry is not None:
        wanted["retry"] = retry
    kwargs = seed_kwargs(url, **wanted)
    kwargs.pop("connection_class", None)
    return RedisCluster(max_connections=int(options.get("max_connections") or 20), **kwargs)


def seed_kwargs(url: str, **options: Any) -> dict[str, Any]:
    """The connection arguments of the node a ``redis+cluster://`` URL names (any node serves pub/sub).

    Raises:
        InvalidURL: the URL does not parse, or it names a database other than 0 (a cluster has one).
    """
    kwargs = connection_kwargs("redis" + url[len("redis+cluster") :], **options)
    if kwargs.pop("db", 0) not in (0, "0"):
        raise InvalidURL(f"Invalid Redis Cluster URL {mask_password(url)!r}: a cluster has database 0 only")
    return kwargs


def node_connection(
    client: RedisCluster, key: str | None = None, client_name: str | None = None
) -> AbstractConnection:
    """A connection outside ``client``'s pools, to the node serving ``key`` (any node without one)."""
    node = client.get_default_node() if key is None else client.get_node_from_key(key)
    if node is None:
        raise InvalidURL(f"No node of the cluster serves the key {key!r}")
    kwargs = dict(node.connection_kwargs)
    if client_name is not None:
        kwargs["client_name"] = client_name
    connection: AbstractConnection = node.connection_class(**kwargs)
    return connection


def dedicated_connection(client: aioredis.Redis, client_name: str | None = None) -> AbstractConnection:
    """A connection outside ``client``'s pool, to the same server; named ``client_name`` if given."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    if client_name is not None:
        kwargs["client_name"] = client_name
    connection: AbstractConnection = pool.connection_class(**kwargs)
    return connection


def connection_kwargs(url: str, **options: Any) -> dict[str, Any]:
    """redis-py connection arguments for ``url``, with ``options`` over aqueue's defaults.

    Raises:
        InvalidURL: the URL does not parse, or its path is not a database number.
    """
    path = urlsplit(url).path.strip("/")
    if path and not path.isdigit():
        raise InvalidURL(f"Invalid redis URL {mask_password(url)!r}: the path must be a database number")
    try:
        kwargs: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise InvalidURL(f"Invalid redis URL {mask_password(url)!r}: {exc}") from exc
    kwargs.update(options)
    # Replies are awaited under asyncio.timeout(): with a socket_timeout, redis-py sends through
    # asyncio.wait_for, which on Python 3.11 can swallow the cancellation of the calling task.
    kwargs.update(protocol=2, socket_timeout=None)
    kwargs.setdefault("client_name", "aqueue")
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3))
    return kwargs


def pack(*parts: bytes | str | int | float) -> bytes:
    """One command in RESP, encoded as redis-py encodes it (text as UTF-8, numbers as their ``repr``).

    Raises:
        DataError: a part is of another type (a bool, None).
    """
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, bytes):
            data = part
        elif isinstance(part, int | float) and not isinstance(part, bool):
            data = repr(part).encode()
        else:
            raise DataError(f"Invalid input of type: {type(part).__name__!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def exchange(conn: AbstractConnection, packed: bytes | list[bytes], count: int) -> list[Any]:
    """Send ``count`` packed commands and read their replies; an error reply is returned in its place.

    On any failure (cancellation included) the connection is closed, since the replies still due
    would be read by the next caller; the next send reconnects.
    """
    try:
        await conn.send_packed_command(packed)  # a health check only with health_check_interval
        return await read_replies(conn, count)
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


async def read_replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies on ``conn``; an error reply is returned in its place, not raised."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


_Queued = tuple[bytes, int, "asyncio.Future[list[Any]]"]


class Line:
    """One connection whose round trips go one after another, each waited for at most ``timeout`` s.

    A send on an idle line writes at once, in the caller's task; sends that come while a round trip is
    in flight go together in the next write. So concurrent callers share writes and need no pool.
    """

    def __init__(self, conn: AbstractConnection, timeout: float) -> None:
        self.conn, self.timeout = conn, timeout
        self._queued: list[_Queued] = []
        self._busy = False
        self._drainer: asyncio.Task[None] | None = None

    async def send(self, packed: bytes, count: int) -> list[Any]:
        """The replies of the ``count`` commands in ``packed``, an error reply as its ResponseError.

        Raises:
            RedisError, OSError: the connection failed (it is closed; the next send reconnects).
            TimeoutError: no reply in ``timeout`` seconds.
        """
        if self._busy:
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._queued.append((packed, count, future))
            return await future
        self._busy = True
        try:
            return await self._round_trip(packed, count)
        finally:
            if self._queued:
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            else:
                self._busy = False

    async def connect(self) -> None:
        """Open the connection now (else the first send opens it)."""
        if not self.conn.is_connected:
            async with asyncio.timeout(self.timeout):
                await self.conn.connect()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        for *_, future in self._queued:
            future.cancel()
        self._queued.clear()
        await self.conn.disconnect()

    async def _round_trip(self, packed: bytes | list[bytes], count: int) -> list[Any]:
        async with asyncio.timeout(self.timeout):
            return await exchange(self.conn, packed, count)

    async def _drain(self) -> None:
        batch: list[_Queued] = []
        try:
            while self._queued:
                batch = [queued for queued in self._queued if not queued[2].done()]
                self._queued = []
                if not batch:
                    continue
                try:
                    replies = await self._round_trip([p for p, _, _ in batch], sum(n for _, n, _ in batch))
                except Exception as exc:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for _, n, future in batch:
                    if not future.done():
                        future.set_result(replies[start : start + n])
                    start += n
        finally:
            for *_, future in batch:
                if not future.done():
                    future.cancel()  # the line was closed under it
            self._busy, self._drainer = False, None
