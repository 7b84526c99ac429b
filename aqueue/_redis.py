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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from aqueue.exceptions import InvalidURL
from aqueue.urls import mask_password

__all__ = [
    "CLIENT_OPTIONS",
    "cluster_client",
    "connection_kwargs",
    "dedicated_connection",
    "node_connection",
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
