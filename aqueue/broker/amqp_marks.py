"""Marks (``Broker.advance``) on RabbitMQ, which has no key-value store: a lock queue and a value queue.

A process owns the mark ``K`` while its connection holds the exclusive queue ``aqueue.lock.K``: RabbitMQ
lets one connection at a time declare it, and deletes it as soon as that connection closes (the process
exits or crashes, the network goes, ``aclose``), so a dead owner never keeps a mark. Every other process
asking for the mark is answered ``inf`` ("taken"): the owner sends.

The value lives in the durable queue ``aqueue.mark.K`` with ``x-max-length: 1``: one persistent message
whose body is the value. A new owner reads it (fetched, then put back), and raises it by publishing the
new value with a publisher confirm; the queue drops the older message. Only the owner writes, on a plain
(not robust) channel of the connection that holds the lock: after a reconnect that channel is closed, so
a process whose lock went with its old connection cannot write. A value that was not confirmed is not
reported as raised (the call raises), so beat sends each due time at most once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import TYPE_CHECKING

import aio_pika
import aiormq

if TYPE_CHECKING:
    from aqueue.broker.amqp import AMQPBroker

__all__ = ["Marks"]

log = logging.getLogger("aqueue.broker.amqp")


class Marks:
    """The marks this process owns on one AMQP broker, and the channel it writes them on."""

    def __init__(self, broker: AMQPBroker) -> None:
        self._broker = broker
        self._channel: aio_pika.Channel | None = None
        self._owned: dict[str, float | None] = {}
        self._lock = asyncio.Lock()

    async def advance(self, key: str, value: float) -> float | None:
        """See :meth:`aqueue.broker.base.Broker.advance`; ``inf`` when another process owns the mark."""
        name = _name(key)
        async with self._lock:
            with self._broker._errors("keep a beat mark on"):
                try:
                    return await self._advance(name, value)
                except BaseException:
                    self._owned.pop(name, None)  # read it again before the next write
                    raise

    async def _advance(self, name: str, value: float) -> float | None:
        channel = await self._writer()
        if name not in self._owned:
            if not await self._take(name):
                return math.inf
            self._owned[name] = await _read(channel, name)
        previous = self._owned[name]
        if previous is None or previous < value:
            message = aio_pika.Message(repr(value).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, f"aqueue.mark.{name}", mandatory=True)
            self._owned[name] = value
        return previous

    async def _writer(self) -> aio_pika.Channel:
        """The write channel; a new one (and nothing owned until taken again) once the old one closed."""
        if self._channel is None or self._channel.is_closed:
            self._owned.clear()
            connection = await self._broker._ready()
            channel = aio_pika.Channel(connection, publisher_confirms=True, on_return_raises=True)
            await channel.initialize()
            self._channel = channel
        return self._channel

    async def _take(self, name: str) -> bool:
        """Declare the exclusive lock queue; False when another connection holds it."""
        try:
            async with self._broker._scratch() as channel:
                await channel.declare_queue(f"aqueue.lock.{name}", exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:
            return False
        return True


async def _read(channel: aio_pika.Channel, name: str) -> float | None:
    queue = await channel.declare_queue(f"aqueue.mark.{name}", durable=True, arguments={"x-max-length": 1})
    message = await queue.get(no_ack=False, fail=False)
    if message is None:
        return None
    await message.nack(requeue=True)
    try:
        return float(message.body)
    except ValueError:
        log.warning("Mark queue aqueue.mark.%s holds %r, not a number: starting it again", name, message.body)
        return None


def _name(key: str) -> str:
    """``key`` as a queue-name suffix: queue names are at most 255 bytes."""
    if len(key.encode()) <= 200:
        return key
    return f"{key.encode()[:100].decode(errors='ignore')}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"
