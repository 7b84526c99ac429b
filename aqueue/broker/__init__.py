"""Brokers: the seam in :mod:`aqueue.broker.base`, one module per transport, and ``from_url``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aqueue.broker.base import Broker, Consumer, Delivery
from aqueue.exceptions import MissingExtra
from aqueue.urls import BROKER_SCHEMES, parse

__all__ = ["Broker", "Consumer", "Delivery", "from_url"]


def from_url(url: str, options: Mapping[str, Any] | None = None) -> Broker:
    """The broker for ``url``; ``options`` are the ``broker_transport_options`` setting.

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
        case "redis" | "rediss" as scheme:
            try:
                from aqueue.broker.redis import RedisBroker
            except ModuleNotFoundError as exc:
                if not MissingExtra.caused_by(exc, "redis"):
                    raise
                raise MissingExtra(scheme, "redis", "redis") from exc
            return RedisBroker(url, **options)
        case scheme:
            try:
                from aqueue.broker.amqp import AMQPBroker
            except ModuleNotFoundError as exc:
                if not MissingExtra.caused_by(exc, "aio_pika"):
                    raise
                raise MissingExtra(scheme, "amqp", "aio-pika") from exc
            return AMQPBroker(url, **options)
