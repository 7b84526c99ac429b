"""Brokers: the seam in :mod:`aqueue.broker.base`, one module per transport, and ``from_url``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aqueue.broker.base import Broker, Consumer, Delivery
from aqueue.exceptions import ImproperlyConfigured, MissingExtra
from aqueue.queues import QueueDeclarations
from aqueue.urls import BROKER_SCHEMES, parse

__all__ = ["Broker", "Consumer", "Delivery", "from_url"]


def from_url(
    url: str, options: Mapping[str, Any] | None = None, *, queues: QueueDeclarations | None = None
) -> Broker:
    """The broker for ``url``; ``options`` are the ``broker_transport_options`` setting.

    On Redis, the option ``layout`` chooses the keys: ``"streams"`` (the default, aqueue's own) or
    ``"kombu"`` (Celery's lists, shared with Celery clients and workers).

    ``queues`` says which arguments each queue is declared with, for transports that declare queues.

    Raises:
        InvalidURL: an unknown scheme or a malformed URL.
        MissingExtra: the transport's optional dependency is not installed (names the pip command).
    """
    options = dict(options or {})
    match parse(url, kinds=BROKER_SCHEMES, role="broker").scheme:
        case "memory":
            from aqueue.broker.memory import MemoryBroker

            return MemoryBroker(url)
        case "sqlite":
            from aqueue.broker.sqlite import SQLiteBroker

            return SQLiteBroker(url, **options)
        case "redis" | "rediss" | "sentinel" as scheme:
            match options.pop("layout", "streams"):
                case "streams":
                    with MissingExtra.guard(scheme, "redis"):
                        from aqueue.broker.redis import RedisBroker
                    return RedisBroker(url, **options)
                case "kombu":
                    with MissingExtra.guard(scheme, "redis"):
                        from aqueue.broker.redis_kombu import KombuRedisBroker
                    return KombuRedisBroker(url, **options)
                case layout:
                    raise ImproperlyConfigured(
                        f"Unknown Redis broker layout {layout!r}: the layouts are 'streams' (the default) "
                        "and 'kombu' (Celery's, to share queues with Celery workers and clients)."
                    )
        case "redis+cluster":
            if options.pop("layout", "streams") != "streams":
                raise ImproperlyConfigured(
                    "On a Redis Cluster (redis+cluster://) aqueue keeps queues in Streams only: kombu's "
                    "layout is not available there (kombu, so Celery, has no Redis Cluster transport). "
                    "Remove the 'layout' option, or share queues with Celery on one Redis server or "
                    "a Sentinel-managed one."
                )
            with MissingExtra.guard("redis+cluster", "redis"):
                from aqueue.broker.redis_cluster import RedisClusterBroker
            return RedisClusterBroker(url, **options)
        case scheme:
            with MissingExtra.guard(scheme, "amqp"):
                from aqueue.broker.amqp import AMQPBroker
            return AMQPBroker(url, queues=queues, **options)
