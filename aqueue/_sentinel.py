"""Redis Sentinel: the master's clients, and how they follow a failover.

URLs are Celery's and kombu's: ``sentinel://[[user]:password@]host[:port][/db]``, several joined by
``;`` (``sentinel://h1:26379;sentinel://h2:26379/0``), one per sentinel. A URL's user, password and
database are the master's (and its replica's); any of the URLs may give them, and URLs that give
different ones are an error. Transport options: ``master_name`` (required: the name the sentinels
monitor), ``sentinel_kwargs`` (connection arguments for the sentinels themselves, such as their
``password``; their ``socket_timeout`` is the longest wait for a sentinel's reply, 2 s by default) and
``min_other_sentinels`` (a sentinel that sees fewer peers is not believed).

Following a failover. Every connection asks the sentinels for the master's address whenever it
connects, whatever path reconnects it. A master that has become a replica answers writes with
``READONLY``, which drops the connection. But in a ``SENTINEL FAILOVER`` the old master keeps
accepting writes for 10 to 20 s after its replica was promoted (until the sentinels reconfigure it),
and what it accepts then is thrown away when it becomes a replica. So each pool also listens to one
sentinel's events (of every sentinel: only the one leading a failover tells which replica it selected):

- ``+selected-slave`` names the replica about to be promoted, before it is: from then on, for at most
  10 s or until the sentinels name it, the pool takes that replica for the master, and drops every
  connection it made (pooled or not) that is on another address. Until the promotion is done, the
  replica refuses writes (``READONLY``, a dropped connection again) and its users retry; nothing
  more is written to the old master, so nothing is thrown away but what replication had not copied
  yet (milliseconds on a local network). A failover that is aborted costs those 10 s.
- ``+promoted-slave`` and ``+switch-master`` (and a reconnection to a sentinel) make the pool check
  the master's address again and drop what is elsewhere.

Users see a dropped connection, and reconnect to the new master as after any outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqueue._redis import connection_kwargs
from aqueue._tasks import cancel_until_done
from aqueue.exceptions import ImproperlyConfigured, InvalidURL
from aqueue.urls import alternatives, mask_password

__all__ = ["sentinel_client"]

logger = logging.getLogger("aqueue.sentinel")

_PORT = 26379
_TIMEOUT = 2.0
_EVENTS = ("+selected-slave", "+promoted-slave", "+switch-master")
_PIN = 10.0
"""Seconds a replica selected for promotion is taken as the master before the sentinels name it."""

_STOP_TIMEOUT = 5.0
"""Seconds the failover event listener gets to stop when its pool is closed."""


def sentinel_client(
    url: str, options: dict[str, Any], connection: dict[str, Any], *, max_connections: int, setting: str
) -> aioredis.Redis:
    """A client of the master the sentinels of ``url`` name; ``connection`` are its connection options.

    Raises:
        InvalidURL: a part of the URL is not a sentinel URL, or parts disagree.
        ImproperlyConfigured: no ``master_name`` option.
    """
    master_name = options.get("master_name")
    if not master_name:
        raise ImproperlyConfigured(
            f"The URL {mask_password(url)!r} names Redis Sentinel but not the master to use: "
            f"set {setting}={{'master_name': 'mymaster'}} (the name the sentinels monitor)."
        )
    # One try per sentinel and per connection: whoever connects retries with backoff of its own.
    sentinel_kwargs: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": _TIMEOUT}
    sentinel_kwargs.update(options.get("sentinel_kwargs") or {})
    # Replies are awaited under asyncio.timeout(), as the master's (aqueue._redis.connection_kwargs):
    # with a socket_timeout (redis-py's default is 5 s), redis-py sends through asyncio.wait_for, which
    # on Python 3.11 loses a cancellation that comes as the send completes: the event listeners would
    # not stop when their pool is closed.
    timeout = float(sentinel_kwargs.pop("socket_timeout", None) or _TIMEOUT)
    sentinel_kwargs["socket_timeout"] = None
    sentinels = _Sentinels(
        _nodes(url),
        timeout=timeout,
        min_other_sentinels=int(options.get("min_other_sentinels") or 0),
        sentinel_kwargs=sentinel_kwargs,
    )
    pool = _SentinelPool(
        str(master_name),
        sentinels,
        max_connections=max_connections,
        timeout=20,
        connection_class=_MasterConnection,
        **_master_kwargs(url, connection),
    )
    return aioredis.Redis.from_pool(pool)


def _nodes(url: str) -> list[tuple[str, int]]:
    nodes = []
    for part in alternatives(url):
        parts = urlsplit(part)
        if parts.scheme != "sentinel":
            raise InvalidURL(
                f"Invalid Sentinel URL {mask_password(url)!r}: every ';'-separated part must be "
                f"sentinel://host:port, not {mask_password(part)!r}"
            )
        nodes.append((parts.hostname or "localhost", parts.port or _PORT))
    return nodes


def _master_kwargs(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The master's connection arguments: user, password and database from whichever URL gives them."""
    given: dict[str, Any] = {}
    for part in alternatives(url):
        kwargs = connection_kwargs("redis" + part[len("sentinel") :])
        parts = urlsplit(part)
        for name, present in (("username", parts.username), ("password", parts.password)):
            _agree(url, given, name, kwargs.get(name), present is not None)
        _agree(url, given, "db", kwargs.get("db", 0), bool(parts.path.strip("/")))
    kwargs = connection_kwargs("redis://localhost", **options)
    for name in ("host", "port"):
        kwargs.pop(name, None)
    kwargs.update(given)
    return kwargs


def _agree(url: str, given: dict[str, Any], name: str, value: Any, present: bool) -> None:
    if not present:
        return
    if name in given and given[name] != value:
        raise InvalidURL(
            f"Invalid Sentinel URL {mask_password(url)!r}: its parts give different values of {name}"
        )
    given[name] = value


class _Sentinels(Sentinel):
    """redis-py's Sentinel client, whose failure to find the master says which sentinel said what."""

    def __init__(self, nodes: list[tuple[str, int]], *, timeout: float, **kwargs: Any) -> None:
        super().__init__(nodes, **kwargs)  # type: ignore[no-untyped-call]
        self.nodes = nodes
        self.timeout = timeout
        """The longest wait for a sentinel's reply, in seconds."""

    async def discover_master(self, service_name: str) -> Any:
        reasons = []
        for i, sentinel in enumerate(self.sentinels):
            host, port = self.nodes[i]
            try:
                async with asyncio.timeout(self.timeout):
                    masters: dict[str, Any] = await sentinel.sentinel_masters()  # type: ignore[assignment]
                state = masters.get(service_name)
            except TimeoutError:  # the connection was closed: its reply comes no more
                reasons.append(f"{host}:{port}: no reply in {self.timeout:g} s")
                continue
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                reasons.append(f"{host}:{port}: {str(exc) or type(exc).__name__}")
                continue
            if state and self.check_master_state(state, service_name):
                self.sentinels[0], self.sentinels[i] = sentinel, self.sentinels[0]
                self.nodes[0], self.nodes[i] = self.nodes[i], self.nodes[0]
                return state["ip"], state["port"]
            reasons.append(
                f"{host}:{port}: " + ("no master of that name" if not state else "the master is down")
            )
        raise MasterNotFoundError(
            f"Redis Sentinel: no master named {service_name!r} is available from the sentinels "
            f"({'; '.join(reasons)})"
        )


class _MasterConnection(SentinelManagedConnection):
    """A connection that asks the sentinels for the master each time it connects, by whatever path.

    redis-py's own asks only in ``connect()``; a command sent on a closed connection reconnects through
    ``connect_check_health()``, which would go back to the address it had: a master that may be a
    replica by now.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.connection_pool.members.add(self)

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        self.connection_pool.watch()
        self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )

    async def _connect_retry(self) -> None:
        await self.connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )

    def drop(self) -> None:
        """Close the socket under whoever is using it: they see a dropped connection and reconnect."""
        writer = self._writer
        if writer is not None:
            writer.transport.abort()


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A bounded pool of connections to the master; it drops them when the master moves (see above)."""

    sentinel_manager: _Sentinels

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.members: weakref.WeakSet[_MasterConnection] = weakref.WeakSet()
        self._listeners: dict[int, asyncio.Task[None]] = {}
        """Each sentinel's event listener, by the ``id`` of its client."""
        self._pin: tuple[tuple[str, int], float] | None = None
        """The replica the sentinels are promoting, and until when it stands for the master."""

    async def get_master_address(self) -> tuple[str, int]:
        address: tuple[str, int] = tuple(await super().get_master_address())  # type: ignore[no-untyped-call]
        if self._pin is None:
            return address
        promoted, until = self._pin
        if address == promoted or time.monotonic() > until:
            self._pin = None
            return address
        return promoted

    def watch(self) -> None:
        """Listen to the sentinels' failover events, from now until the pool is closed.

        Every sentinel's: only the one leading a failover tells of the replica it selected.
        """
        for sentinel in self.sentinel_manager.sentinels:
            listener = self._listeners.get(id(sentinel))
            if listener is None or listener.done():
                loop = asyncio.get_running_loop()
                self._listeners[id(sentinel)] = loop.create_task(self._listen_forever(sentinel))

    async def aclose(self) -> None:
        # Each listener is cancelled itself, again while it runs on (see cancel_until_done).
        listeners = list(self._listeners.values())
        self._listeners.clear()
        if await cancel_until_done(listeners, _STOP_TIMEOUT):
            logger.warning("Redis Sentinel: the event listeners of %r did not stop", self.service_name)
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()

    async def _listen_forever(self, sentinel: aioredis.Redis) -> None:
        pause = 0.1
        while True:
            try:
                await self._listen(sentinel)
            except (RedisError, OSError) as exc:
                logger.debug("Sentinel events from %s stopped: %s", sentinel, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _listen(self, sentinel: aioredis.Redis) -> None:
        async with sentinel.pubsub() as events:
            async with asyncio.timeout(self.sentinel_manager.timeout):
                await events.subscribe(*_EVENTS)
            await self._follow()  # what moved while nobody listened
            while True:
                message = await events.get_message(ignore_subscribe_messages=True, timeout=5.0)
                words = str(message.get("data", b""), errors="replace").split() if message else []
                if self.service_name not in words:
                    continue
                if message and message.get("channel") == b"+selected-slave" and len(words) >= 4:
                    # "slave <ip:port> <ip> <port> @ <master> ...": the replica about to be promoted.
                    # Writes sent to the old master from now on would be thrown away.
                    self._pin = ((words[2], int(words[3])), time.monotonic() + _PIN)
                await self._follow()

    async def _follow(self) -> None:
        """Drop the connections that are not on the master the sentinels name now."""
        address = await self.get_master_address()
        stale = [c for c in self.members if c.is_connected and (c.host, c.port) != tuple(address)]
        if stale:
            logger.warning(
                "Redis Sentinel: master %r is now at %s:%s; reconnecting %d connection(s) to it",
                self.service_name, *address, len(stale),
            )  # fmt: skip
        for connection in stale:
            connection.drop()
