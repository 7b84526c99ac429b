"""Celery's exchanges over any broker: what monitoring events and remote control travel on.

Celery's events and its remote control (kombu's "pidbox") are messages sent to named *exchanges* with a
routing key, and read from short-lived queues bound to them:

- events: the topic exchange ``celeryev``, routing key the event type with ``.`` for ``-``
  (``task.succeeded``; ``task.multi`` for a list of events); receivers bind ``#``;
- remote-control requests: the fanout exchange ``<control_exchange>.pidbox``; each worker reads
  its own queue ``<hostname>.<control_exchange>.pidbox``;
- replies: the direct exchange ``reply.<control_exchange>.pidbox``, routing key the asker's id,
  read from ``<id>.reply.<control_exchange>.pidbox``.

:meth:`Broker.send_to_exchange <aqueue.broker.base.Broker.send_to_exchange>` and
:meth:`~aqueue.broker.base.Broker.bind_exchange` carry them. Redis and RabbitMQ lay them out as kombu
does, so Celery's own tools and Flower read and write them; every other broker carries them over its
:meth:`~aqueue.broker.base.Broker.broadcast` channels (one channel per exchange, the routing key in the
message, matched by the subscriber), which reach every process of that broker.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import pydantic_core

if TYPE_CHECKING:
    from aqueue.broker.base import Broker

__all__ = [
    "Exchange",
    "ExchangeMessage",
    "Listener",
    "bind_over_broadcast",
    "routes",
    "send_over_broadcast",
    "topic_matches",
]

ExchangeType = Literal["direct", "fanout", "topic"]


@dataclass(frozen=True, slots=True)
class Exchange:
    """A kombu exchange, declared as Celery declares it (a different ``durable`` is refused by RabbitMQ)."""

    name: str
    type: ExchangeType
    durable: bool = False


@dataclass(frozen=True, slots=True)
class Listener:
    """The short-lived queue a reader binds: exclusive to its connection, deleted when it goes.

    ``message_ttl`` and ``expires`` (seconds) become RabbitMQ's ``x-message-ttl`` and ``x-expires``,
    as Celery sets them.
    """

    queue: str
    binding_key: str = ""
    message_ttl: float | None = None
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class ExchangeMessage:
    """One message on an exchange: a body (JSON for events and remote control) and its headers."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = ""
    content_type: str = "application/json"
    delivery_mode: int = 1
    """1 transient (events, replies), 2 persistent (remote-control requests), as Celery sends them."""

    def pack(self) -> bytes:
        """The message as one broadcast payload: a JSON line of its fields, then the body."""
        meta = {"routing_key": self.routing_key, "headers": self.headers, "content_type": self.content_type}
        return pydantic_core.to_json(meta) + b"\n" + self.body

    @classmethod
    def unpack(cls, data: bytes) -> ExchangeMessage:
        """The message :meth:`pack` made.

        Raises:
            ValueError: ``data`` is not such a payload.
        """
        meta, sep, body = data.partition(b"\n")
        fields = pydantic_core.from_json(meta) if sep else None
        if not isinstance(fields, dict):
            raise ValueError("not an exchange message")
        return cls(
            body, fields.get("headers") or {}, str(fields.get("routing_key") or ""), fields["content_type"]
        )


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """Whether a topic exchange routes ``routing_key`` to a queue bound with ``binding_key``.

    ``*`` stands for one dot-separated word and ``#`` for any text, as kombu's in-memory topic exchange
    reads them.
    """
    return _topic_pattern(binding_key).fullmatch(routing_key) is not None


@lru_cache(maxsize=256)
def _topic_pattern(binding_key: str) -> re.Pattern[str]:
    words = (r".*?" if w == "#" else r"[^.]+" if w == "*" else re.escape(w) for w in binding_key.split("."))
    return re.compile(r"\.".join(words))


def routes(exchange: Exchange, binding_key: str, routing_key: str) -> bool:
    """Whether ``exchange`` routes ``routing_key`` to a queue bound with ``binding_key``."""
    if exchange.type == "fanout":
        return True
    if exchange.type == "direct":
        return binding_key == routing_key
    return topic_matches(binding_key, routing_key)


async def send_over_broadcast(broker: Broker, exchange: Exchange, message: ExchangeMessage) -> None:
    """``send_to_exchange`` for brokers without kombu's layout: one broadcast channel per exchange."""
    await broker.broadcast(_channel(exchange), message.pack())


@asynccontextmanager
async def bind_over_broadcast(
    broker: Broker, exchange: Exchange, listener: Listener
) -> AsyncIterator[AsyncIterator[ExchangeMessage]]:
    """``bind_exchange`` for brokers without kombu's layout: the exchange's channel, filtered here."""
    async with broker.subscribe(_channel(exchange)) as inbox:
        yield _routed(inbox, exchange, listener.binding_key)


async def _routed(
    inbox: AsyncIterator[bytes], exchange: Exchange, binding_key: str
) -> AsyncIterator[ExchangeMessage]:
    async for data in inbox:
        try:
            message = ExchangeMessage.unpack(data)
        except (ValueError, KeyError):
            yield ExchangeMessage(data)  # the reader says what is wrong with it
            continue
        if routes(exchange, binding_key, message.routing_key):
            yield message


def _channel(exchange: Exchange) -> str:
    return f"exchange.{exchange.name}"
