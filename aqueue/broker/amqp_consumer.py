"""The RabbitMQ consumer: deliveries pushed on one channel, settled through an :class:`Outbox`.

The channel's QoS prefetch count is the consumer's prefetch. Deliveries are taken straight from
aiormq (no aio-pika message object per delivery) and settled in batches: each loop turn's acks and
nacks go out as one write (see :mod:`aqueue.broker.amqp_wire`). After a reconnect the robust channel
is re-opened with its QoS and queues, and this consumer starts consuming on it again; deliveries of
the old channel cannot be settled any more (RabbitMQ has put them back and delivers them again, with
``redelivered`` set), so acknowledging one raises :class:`DeliveryLost`.

Each delivery carries the message's headers and its ``reply_to`` and ``priority`` for the codec. One
whose ``eta`` header (Celery's ISO 8601 time; ``x-aqueue-eta`` in milliseconds for a message without
Celery's headers) has not come yet goes to a delay queue instead of being handed out. ``reject()``
publishes a copy to the dead-letter queue in the background and acknowledges the delivery once
RabbitMQ confirmed the copy (if that fails, the delivery goes back to the queue).

A message no delivery can be made of is dead-lettered and logged, never fatal. That includes message
properties or header names that are not UTF-8: pamqp refuses to decode them and aiormq then drops the
whole connection, after which RabbitMQ delivers the same message again at once, so one such message
would stall every consumer of its queue. At import this module makes pamqp's short strings fall back to
backslash escapes (a content type like that is refused, so the message is dead-lettered) and a header
table it cannot decode come out as ``{UNREADABLE_HEADERS: raw bytes}``, which the consumer rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import aiormq
import aiormq.abc
import pamqp.decode
from aio_pika.abc import AbstractRobustChannel
from aiormq.exceptions import ChannelInvalidStateError
from pamqp import commands as spec

from aqueue.broker import amqp_frames, amqp_reader, amqp_table
from aqueue.broker.amqp_table import UNREADABLE_HEADERS
from aqueue.broker.amqp_wire import Outbox
from aqueue.broker.base import Consumer, Delivery
from aqueue.exceptions import DeliveryLost, OperationalError
from aqueue.message import Envelope
from aqueue.protocol import BROKER_HEADERS

if TYPE_CHECKING:
    from aqueue.broker.amqp import AMQPBroker

__all__ = ["ETA_HEADER", "RESENT_HEADER", "UNREADABLE_HEADERS", "AMQPConsumer", "eta_of"]

log = logging.getLogger("aqueue.broker.amqp")

_FLUSH_TIMEOUT = 5.0
"""Seconds a closing consumer waits for its last acknowledgements to be written."""

ETA_HEADER = "x-aqueue-eta"
"""Header with a delayed message's due time, in integer milliseconds since the epoch."""

RESENT_HEADER = "x-aqueue-resent"
"""Header of a message published again by a retry that could not know whether the first attempt
landed: the consumer hands it out as a redelivery, so the worker checks it did not run already."""


def _tolerate_non_utf8() -> None:
    """Decode short strings and header tables that are not UTF-8 instead of failing the connection.

    Tables are decoded by :mod:`aqueue.broker.amqp_table`, which does so itself; where it could not be
    installed (another pamqp layout), pamqp's own decoder is wrapped to do the same.
    """
    methods: dict[str, Any] = getattr(pamqp.decode, "METHODS", {})
    strict_short, strict_table = methods.get("shortstr"), methods.get("table")
    if strict_short is None or strict_table is None:
        return  # another pamqp layout: keep its behaviour

    def short_str(value: bytes) -> tuple[int, Any]:
        try:
            return strict_short(value)  # type: ignore[no-any-return]
        except UnicodeDecodeError:
            return value[0] + 1, value[1 : value[0] + 1].decode(errors="backslashreplace")

    def field_table(value: bytes) -> tuple[int, Any]:
        try:
            return strict_table(value)  # type: ignore[no-any-return]
        except UnicodeDecodeError:
            size = int.from_bytes(value[:4], "big")
            return size + 4, {UNREADABLE_HEADERS: value[4 : size + 4]}

    methods["shortstr"] = short_str
    if not amqp_table.install():
        methods["table"] = field_table
    amqp_frames.install()  # faster, and as tolerant of text that is not UTF-8
    amqp_reader.install()


_tolerate_non_utf8()


def eta_of(headers: Mapping[str, Any] | None) -> float | None:
    """The due time of a message with these headers (Unix time), or None (none, or unreadable)."""
    if not headers:
        return None
    value = headers.get("eta")
    if value is None:
        value = headers.get(ETA_HEADER)
        return value / 1000 if isinstance(value, int) else None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None  # the codec says what is wrong with it
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _forwarded(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """``headers`` without those RabbitMQ added, for sending the message on."""
    if not headers:
        return headers
    return {k: v for k, v in headers.items() if not k.startswith(BROKER_HEADERS)}


def _wake(arrived: asyncio.Future[None]) -> None:
    if not arrived.done():
        arrived.set_result(None)


class AMQPConsumer(Consumer):
    """Deliveries pushed by RabbitMQ on one channel, QoS prefetch = the consumer's prefetch."""

    def __init__(self, broker: AMQPBroker, queues: Sequence[str], prefetch: int) -> None:
        super().__init__(queues, prefetch)
        self.broker = broker
        self._channel: AbstractRobustChannel | None = None
        self._outbox: Outbox | None = None
        self._start_lock = asyncio.Lock()
        self._inbox: deque[tuple[str, Outbox, int, aiormq.abc.DeliveredMessage]] = deque()
        self._arrived: asyncio.Future[None] | None = None
        self._dead_lettering: set[asyncio.Task[None]] = set()

    async def _start(self) -> None:
        async with self._start_lock:
            if self._channel is not None:
                return
            channel = await self.broker.channel(prefetch=self.prefetch)
            try:
                with self.broker._errors("consume from"):
                    for name in self.queues:
                        arguments = await self.broker.layout.queue(name)
                        await channel.declare_queue(
                            name, durable=True, arguments=arguments, passive=arguments is None
                        )
                    await self._consume(channel)
            except BaseException:
                # A failed close must not replace what went wrong (a cancellation above all).
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            channel.reopen_callbacks.add(self._consume)  # type: ignore[arg-type]
            self._channel = channel

    async def _consume(self, channel: AbstractRobustChannel) -> None:
        """Consume every queue on ``channel``'s current aiormq channel (again, after a reconnect)."""
        raw = cast(aiormq.Channel, await channel.get_underlay_channel())
        outbox = self._outbox = Outbox(raw)
        for name in self.queues:
            await amqp_reader.consume(raw, name, functools.partial(self._received, name, outbox))

    def _received(self, queue: str, outbox: Outbox, message: aiormq.abc.DeliveredMessage) -> None:
        deliver = cast(spec.Basic.Deliver, message.delivery)
        tag = cast(int, deliver.delivery_tag)
        outbox.delivered(tag)
        self._inbox.append((queue, outbox, tag, message))
        if self._arrived is not None:
            _wake(self._arrived)

    async def _fetch(self, n: int) -> Sequence[Delivery]:
        await self._start()
        if not self._inbox:
            # A bare future woken by the next delivery (an Event under wait_for costs a task per wait).
            loop = asyncio.get_running_loop()
            arrived = self._arrived = loop.create_future()
            timer = loop.call_later(1.0, _wake, arrived)
            try:
                await arrived
            finally:
                timer.cancel()
                self._arrived = None
            if not self._inbox:
                return []
        out: list[Delivery] = []
        while self._inbox and len(out) < n:
            queue, outbox, tag, message = self._inbox.popleft()
            if outbox.closed:
                continue  # from before a reconnect: RabbitMQ delivers it again
            try:
                properties = message.header.properties
                headers = properties.headers
                eta = eta_of(headers)
                if eta is not None and eta > time.time():
                    await self._hop(queue, outbox, tag, message, eta)
                    continue
                message_id = properties.message_id or str((headers or {}).get("id", ""))
                again = bool(message.redelivered)
                if headers is not None:
                    if UNREADABLE_HEADERS in headers:
                        raise ValueError(
                            f"its headers are not UTF-8 text: {headers[UNREADABLE_HEADERS]!r:.80}"
                        )
                    again = again or RESENT_HEADER in headers
                out.append(
                    Delivery(
                        self,
                        message_id,
                        queue,
                        message.body,
                        properties.content_type or "",
                        again,
                        (outbox, tag),
                        headers,
                        {"reply_to": properties.reply_to, "priority": properties.priority},
                    )
                )
            except Exception as exc:  # a message no delivery can be made of must not stop the consumer
                log.error("Rejecting unreadable message (delivery tag %d) from queue %r: %r", tag, queue, exc)
                self._dead_letter_soon(_unreadable(queue, message, tag), outbox, tag)
        return out

    async def _hop(
        self, queue: str, outbox: Outbox, tag: int, message: aiormq.abc.DeliveredMessage, eta: float
    ) -> None:
        """Send an early message back to a delay queue for the time left, then drop this copy."""
        envelope = _envelope(queue, message, eta)
        try:
            await self.broker.publish([envelope])
            outbox.ack(tag)
        except (OperationalError, ChannelInvalidStateError) as exc:
            # Unsettled, it goes back to the queue when this channel closes.
            log.warning("Could not delay message %s again: %s", envelope.id, exc)

    def _lost(self, delivery: Delivery) -> bool:
        outbox: Outbox = delivery.tag[0]
        return outbox.closed

    async def _ack(self, delivery: Delivery) -> None:
        outbox, tag = delivery.tag
        try:
            outbox.ack(tag)
        except ChannelInvalidStateError as exc:
            # RabbitMQ has put it back and delivers it again: the caller must not run it now.
            raise DeliveryLost(f"Message {delivery.id} was not acknowledged: its channel closed") from exc

    async def _reject(self, delivery: Delivery) -> None:
        outbox, tag = delivery.tag
        properties = delivery.properties or {}
        envelope = Envelope(
            delivery.id,
            delivery.queue,
            delivery.body,
            delivery.content_type,
            priority=properties.get("priority"),
            headers=_forwarded(delivery.headers),
            reply_to=properties.get("reply_to"),
        )
        self._dead_letter_soon(envelope, outbox, tag)

    def _dead_letter_soon(self, envelope: Envelope, outbox: Outbox, tag: int) -> None:
        job = asyncio.get_running_loop().create_task(self._dead_letter(envelope, outbox, tag))
        self._dead_lettering.add(job)
        job.add_done_callback(self._dead_lettering.discard)

    async def _dead_letter(self, envelope: Envelope, outbox: Outbox, tag: int) -> None:
        """Copy to the dead-letter queue, then acknowledge; give the message back if the copy failed."""
        try:
            await self.broker.dead_letter(envelope)
        except (OperationalError, ChannelInvalidStateError) as exc:
            log.error("Could not dead-letter message %s: %s; it goes back to the queue", envelope.id, exc)
            with contextlib.suppress(ChannelInvalidStateError):
                outbox.nack(tag, requeue=True)
            return
        try:
            outbox.ack(tag)
        except ChannelInvalidStateError:
            log.info(
                "Message %s was dead-lettered, but its channel closed: it is delivered again", envelope.id
            )

    async def _requeue(self, delivery: Delivery) -> None:
        self._nack(delivery, requeue=True)

    def _nack(self, delivery: Delivery, requeue: bool) -> None:
        outbox, tag = delivery.tag
        try:
            outbox.nack(tag, requeue)
        except ChannelInvalidStateError:
            # The channel closed since: RabbitMQ has put the message back and delivers it again.
            log.info("Message %s not settled: its channel closed, it will be delivered again", delivery.id)

    async def aclose(self) -> None:
        """Stop consuming; RabbitMQ takes back every delivery not settled yet."""
        await super().aclose()
        if self._dead_lettering:
            await asyncio.wait(self._dead_lettering, timeout=_FLUSH_TIMEOUT)
        channel, self._channel = self._channel, None
        outbox, self._outbox = self._outbox, None
        self._inbox.clear()
        if channel is None:
            return
        channel.reopen_callbacks.discard(self._consume)  # type: ignore[arg-type]
        if outbox is not None and not outbox.closed:
            # Bounded: a connection that died with its write queue full never drains it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_TIMEOUT):
                    await outbox.flush()
        if not channel.is_closed:
            with self.broker._errors("stop consuming from"):
                await channel.close()


def _unreadable(queue: str, message: aiormq.abc.DeliveredMessage, tag: int) -> Envelope:
    """A message no delivery could be made of, as an envelope for its dead-letter queue: its body as it
    came, with what of its properties can be read, and without headers that cannot."""
    try:
        properties = message.header.properties
        message_id, content_type = properties.message_id, properties.content_type
    except Exception:
        message_id = content_type = None
    return Envelope(message_id or f"delivery-{tag}", queue, message.body, content_type or "")


def _envelope(queue: str, message: aiormq.abc.DeliveredMessage, eta: float | None = None) -> Envelope:
    """The delivered message as an envelope to send on: body, properties and headers as they came."""
    properties = message.header.properties
    headers = properties.headers
    return Envelope(
        properties.message_id or str((headers or {}).get("id", "")),
        queue,
        message.body,
        properties.content_type or "",
        eta,
        properties.priority,
        _forwarded(headers),
        reply_to=properties.reply_to,
    )
