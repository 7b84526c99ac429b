"""The one place Redis clients are made: a URL and transport options in, a redis.asyncio client out.

Every Redis user (brokers, the result backend, and through them rate limits, remote control, events
and chords) calls :func:`redis_client`, so each of them understands the same URLs:

- ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://`` (TLS): one server;
- ``sentinel://[[user]:password@]host[:port][/db]``, several joined by ``;`` as in Celery and kombu
  (``sentinel://h1:26379;sentinel://h2:26379/0``): the master that Redis Sentinel names, with the
  ``master_name`` option (required), ``sentinel_kwargs`` (connection arguments for the sentinels
  themselves, such as their ``password``) and ``min_other_sentinels``. A URL's user, password and
  database are the master's; any of the URLs may give them, and URLs that give different ones are an
  error. A connection asks the sentinels for the master whenever it connects, and a master that has
  become a replica answers writes with ``READONLY``, which drops the connection: so after a failover
  every user reconnects to the new master as it would after any dropped connection.

The client has a bounded pool (``max_connections``, default 20, waiting up to 20 s for a free
connection); :func:`dedicated_connection` makes a connection outside it (blocking reads, pub/sub) that
reaches the same server the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqueue.exceptions import ImproperlyConfigured, InvalidURL
from aqueue.urls import alternatives, mask_password

__all__ = [
    "CLIENT_OPTIONS",
    "connection_kwargs",
    "dedicated_connection",
    "redis_client",
]

CONNECTION_OPTIONS: tuple[str, ...] = ("socket_timeout", "socket_connect_timeout", "socket_keepalive")
CONNECTION_OPTIONS += ("health_check_interval", "client_name")
SENTINEL_OPTIONS = ("master_name", "sentinel_kwargs", "min_other_sentinels")
CLIENT_OPTIONS = (*CONNECTION_OPTIONS, *SENTINEL_OPTIONS, "max_connections")
"""The transport options :func:`redis_client` reads; a caller checks the others against its own."""
_SENTINEL_PORT = 26379
_SENTINEL_TIMEOUT = 2.0


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
    max_connections = int(options.pop("max_connections", None) or 20)
    wanted = {name: options[name] for name in CONNECTION_OPTIONS if name in options}
    if retry is not None:
        wanted["retry"] = retry
    if urlsplit(url).scheme != "sentinel":
        pool = BlockingConnectionPool(
            max_connections=max_connections, timeout=20, **connection_kwargs(url, **wanted)
        )
        return aioredis.Redis.from_pool(pool)
    master_name = options.get("master_name")
    if not master_name:
        raise ImproperlyConfigured(
            f"The URL {mask_password(url)!r} names Redis Sentinel but not the master to use: "
            f"set {setting}={{'master_name': 'mymaster'}} (the name the sentinels monitor)."
        )
    kwargs = _master_kwargs(url, wanted)
    # One try per sentinel and per connection: whoever connects retries with backoff of its own.
    sentinel_kwargs: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}
    sentinel_kwargs.update(socket_timeout=_SENTINEL_TIMEOUT, socket_connect_timeout=_SENTINEL_TIMEOUT)
    sentinel_kwargs.update(options.get("sentinel_kwargs") or {})
    sentinels = _Sentinels(
        _sentinel_nodes(url),
        min_other_sentinels=int(options.get("min_other_sentinels") or 0),
        sentinel_kwargs=sentinel_kwargs,
    )
    sentinel_pool = _SentinelPool(  # type: ignore[no-untyped-call]
        str(master_name),
        sentinels,
        max_connections=max_connections,
        timeout=20,
        connection_class=_MasterConnection,
        **kwargs,
    )
    return aioredis.Redis.from_pool(sentinel_pool)


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


def _sentinel_nodes(url: str) -> list[tuple[str, int]]:
    nodes = []
    for part in alternatives(url):
        parts = urlsplit(part)
        if parts.scheme != "sentinel":
            raise InvalidURL(
                f"Invalid Sentinel URL {mask_password(url)!r}: every ';'-separated part must be "
                f"sentinel://host:port, not {mask_password(part)!r}"
            )
        nodes.append((parts.hostname or "localhost", parts.port or _SENTINEL_PORT))
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

    def __init__(self, nodes: list[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(nodes, **kwargs)  # type: ignore[no-untyped-call]
        self.nodes = nodes

    async def discover_master(self, service_name: str) -> Any:
        reasons = []
        for i, sentinel in enumerate(self.sentinels):
            host, port = self.nodes[i] if i < len(self.nodes) else ("?", 0)
            try:
                masters: dict[str, Any] = await sentinel.sentinel_masters()  # type: ignore[assignment]
                state = masters.get(service_name)
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                reasons.append(f"{host}:{port}: {str(exc) or type(exc).__name__}")
                continue
            if state and self.check_master_state(state, service_name):
                self.sentinels[0], self.sentinels[i] = sentinel, self.sentinels[0]
                self.nodes[0], self.nodes[i] = self.nodes[i], self.nodes[0]
                return state["ip"], state["port"]
            reasons.append(
                f"{host}:{port}: " + ("no usable master of that name" if not state else "the master is down")
            )
        raise MasterNotFoundError(
            f"Redis Sentinel: no master named {service_name!r} is available from the sentinels ({'; '.join(reasons)})"
        )


class _MasterConnection(SentinelManagedConnection):
    """A connection that asks the sentinels for the master each time it connects, by whatever path.

    redis-py's own asks only in ``connect()``; a command sent on a closed connection reconnects through
    ``connect_check_health()``, which would go back to the address it had, a master that may be a
    replica by now.
    """

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )

    async def _connect_retry(self) -> None:
        await self.connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A bounded pool of connections to the master the sentinels name; closing it closes theirs too."""

    sentinel_manager: _Sentinels

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()
