"""Celery's exchanges on RabbitMQ, declared and used as kombu does, so Celery's tools and Flower share them.

An exchange is declared once per connection with Celery's type and durability (``celeryev``: topic,
durable; ``<control_exchange>.pidbox``: fanout, transient; ``reply.<control_exchange>.pidbox``: direct,
transient); RabbitMQ refuses a second declaration that differs, so these must agree with Celery's.
Messages carry the properties Celery sets (``content_type``, ``content_encoding``, ``headers``,
``delivery_mode``, ``priority``), and go through the broker's publisher :class:`~aqueue.broker.amqp_wire.Outbox`
(not mandatory: a reply nobody waits for any more is dropped by RabbitMQ, as for Celery). A reader's
queue is exclusive and auto-deleted, with Celery's ``x-message-ttl`` and ``x-expires``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pamqp.encode import encode_table_value, short_string

from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener

if TYPE_CHECKING:
    from aqueue.broker.amqp import AMQPBroker

__all__ = ["AMQPExchanges", "properties"]

_FLAGS = struct.pack(">H", 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0800)
"""content-type, content-encoding, headers, delivery-mode and priority: the properties Celery sets."""
_DOUBLE = struct.Struct(">d")
_UTF8 = short_string("utf-8")


def properties(message: ExchangeMessage) -> bytes:
    """The basic properties of ``message`` as kombu (py-amqp) writes them; a float header is a double."""
    return b"".join(
        (
            _FLAGS,
            short_string(message.content_type),
            _UTF8,
            _table(message.headers),
            struct.pack(">BB", message.delivery_mode, 0),
        )
    )


def _table(headers: dict[str, Any]) -> bytes:
    parts = []
    for key, value in sorted(headers.items()):
        encoded = b"d" + _DOUBLE.pack(value) if isinstance(value, float) else encode_table_value(value)
        parts.append(short_string(key) + encoded)
    data = b"".join(parts)
    return struct.pack(">I", len(data)) + data


class AMQPExchanges:
    """Celery's exchanges on one :class:`~aqueue.broker.amqp.AMQPBroker`."""

    def __init__(self, broker: AMQPBroker) -> None:
        self.broker = broker
        self._declared: set[str] = set()

    def forget(self) -> None:
        """Declare again before the next use (after a reconnect: RabbitMQ may have restarted)."""
        self._declared.clear()

    async def send(self, exchange: Exchange, message: ExchangeMessage) -> None:
        broker = self.broker
        await self._declare(exchange)
        with broker._errors(f"send to exchange {exchange.name!r} on"):
            outbox = await broker._outbox()
            confirmed = outbox.publish(exchange.name, message.routing_key, properties(message), message.body)
            if confirmed is not None:
                await confirmed

    @asynccontextmanager
    async def bind(
        self, exchange: Exchange, listener: Listener
    ) -> AsyncIterator[AsyncIterator[ExchangeMessage]]:
        inbox: asyncio.Queue[ExchangeMessage] = asyncio.Queue()

        async def received(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(
                ExchangeMessage(
                    message.body,
                    dict(message.headers or {}),
                    message.routing_key or "",
                    message.content_type or "",
                    int(message.delivery_mode or 1),
                )
            )

        channel = await self.broker.channel()
        try:
            with self.broker._errors(f"bind queue {listener.queue!r} to exchange {exchange.name!r} on"):
                declared = await channel.declare_exchange(
                    exchange.name, aio_pika.ExchangeType(exchange.type), durable=exchange.durable
                )
                queue = await channel.declare_queue(
                    listener.queue, exclusive=True, auto_delete=True, arguments=_arguments(listener)
                )
                await queue.bind(declared, listener.binding_key)
                await queue.consume(received, no_ack=True)
            yield _drain(inbox)
        finally:
            if not channel.is_closed:
                with self.broker._errors("close a channel on"):
                    await channel.close()

    async def _declare(self, exchange: Exchange) -> None:
        if exchange.name in self._declared:
            return
        async with self.broker._scratch() as channel:
            with self.broker._errors(f"declare exchange {exchange.name!r} on"):
                kind = aio_pika.ExchangeType(exchange.type)
                await channel.declare_exchange(exchange.name, kind, durable=exchange.durable)
        self._declared.add(exchange.name)


def _arguments(listener: Listener) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    if listener.message_ttl is not None:
        arguments["x-message-ttl"] = int(listener.message_ttl * 1000)
    if listener.expires is not None:
        arguments["x-expires"] = int(listener.expires * 1000)
    return arguments


async def _drain(inbox: asyncio.Queue[ExchangeMessage]) -> AsyncIterator[ExchangeMessage]:
    while True:
        yield await inbox.get()
