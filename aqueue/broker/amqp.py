"""amqp:// — RabbitMQ through aio-pika.

URLs: ``amqp://``, ``amqps://`` and ``pyamqp://`` (Celery's name, an alias of ``amqp://``). Missing
parts default to ``guest``/``guest``, ``localhost`` and port 5672 (5671 for ``amqps``); the path is
the vhost, and Celery's ``amqp://guest@localhost//`` means vhost ``/``. Query parameters go to
aio-pika (``heartbeat``, ``reconnect_interval``, ...); ``reconnect_interval`` defaults to 1 s.

Options (``broker_transport_options``): ``confirm_publish`` (default True: ``publish`` returns once
RabbitMQ confirmed every message), ``max_priority`` (``x-max-priority`` of declared queues when
``task_queue_max_priority`` does not say; none by default), ``connect_timeout`` (seconds, default 10)
and ``visibility_timeout`` (accepted so one setting serves every transport, and ignored: RabbitMQ
redelivers when a consumer's channel closes).

Messages are Celery's message protocol v2 (:mod:`aqueue.protocol`), and queues, exchanges, dead
letters and delay queues are laid out and declared as :mod:`aqueue.broker.amqp_layout` says: as
Celery's, so that Celery clients and workers on the same RabbitMQ share the queues. Celery's exchanges, for
monitoring events and remote control, are laid out as kombu does: see :mod:`aqueue.broker.amqp_exchange`.

One robust connection (aio-pika reconnects by itself) carries one publisher channel with publisher
confirms, and one channel per consumer whose QoS prefetch count is the consumer's prefetch. A
consumer of several queues sets that prefetch on each queue, so RabbitMQ may push up to
``prefetch`` per queue; the base class still hands out at most ``prefetch`` at once. After a
reconnect, deliveries of the old channel cannot be settled any more: RabbitMQ has already put them
back, and delivers them again with ``redelivered`` set (the consumer is in
:mod:`aqueue.broker.amqp_consumer`). Publishes and acknowledgements go through an
:class:`~aqueue.broker.amqp_wire.Outbox`, which writes each loop turn's frames at once.

RabbitMQ's delivery acknowledgement timeout (``consumer_timeout``, 30 minutes by default) closes a
channel that holds a delivery unacknowledged longer than that; its deliveries go back to the
queue. With ``task_acks_late=True`` a task running longer than the timeout is therefore delivered
again. RabbitMQ 3.10 only has the server-wide setting: the per-queue policy key ``consumer-timeout``
and the ``x-consumer-timeout`` argument came in later releases (3.10.8 answers "not recognised
policy settings"). Raise ``consumer_timeout`` in rabbitmq.conf for longer tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote

import aio_pika
import aiormq
import pamqp.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from aqueue.broker.amqp_consumer import ETA_HEADER, RESENT_HEADER, AMQPConsumer
from aqueue.broker.amqp_exchange import AMQPExchanges
from aqueue.broker.amqp_layout import Layout, delay_bucket_ms
from aqueue.broker.amqp_marks import Marks
from aqueue.broker.amqp_wire import Outbox, encode_properties
from aqueue.broker.base import Broker, Consumer
from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener
from aqueue.exceptions import ImproperlyConfigured, InvalidURL, OperationalError
from aqueue.message import Codec, Envelope
from aqueue.protocol import CELERY
from aqueue.queues import QueueDeclarations
from aqueue.urls import mask_password, parse

__all__ = ["AMQPBroker", "amqp_url", "delay_bucket_ms"]

log = logging.getLogger(__name__)

_OPTIONS = ("confirm_publish", "connect_timeout", "max_priority", "visibility_timeout")
_NO_PROPERTIES = encode_properties()
_ENCODINGS = {"application/json": "utf-8"}
"""kombu's content_encoding of each content type; every other one is ``binary``."""

_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def amqp_url(url: str) -> URL:
    """The aio-pika URL for an ``amqp://``, ``amqps://`` or ``pyamqp://`` URL, defaults filled in.

    Raises:
        InvalidURL: another scheme, or a malformed URL.
    """
    parts = parse(url, kinds=("amqp", "amqps", "pyamqp"), role="broker")
    secure = parts.scheme == "amqps"
    query = dict(parse_qsl(parts.query))
    query.setdefault("reconnect_interval", "1")
    try:
        return URL.build(
            scheme="amqps" if secure else "amqp",
            user=unquote(parts.username or "") or "guest",
            password=unquote(parts.password or "") or "guest",
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if secure else 5672),
            path="/" + (unquote(parts.path[1:]) or "/"),
            query=query,
        )
    except ValueError as exc:
        raise InvalidURL(f"Invalid broker URL {mask_password(url)!r}: {exc}") from exc


def _check_options(options: dict[str, Any]) -> None:
    for name in sorted(options):
        if name not in _OPTIONS:
            close = difflib.get_close_matches(name, _OPTIONS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ImproperlyConfigured(
                f"Unknown AMQP transport option {name!r}.{hint} Known options: {', '.join(_OPTIONS)}."
            )
    priority = options.get("max_priority")
    if priority is not None and not (isinstance(priority, int) and 1 <= priority <= 255):
        raise ImproperlyConfigured(f"max_priority must be an integer from 1 to 255, not {priority!r}.")


class AMQPBroker(Broker):
    """RabbitMQ over one robust aio-pika connection.

    Parameters:
        url: ``amqp://user:password@host:port/vhost`` (also ``amqps://`` and ``pyamqp://``).
        queues: the arguments each queue is declared with (Celery's queue settings).
        options: ``confirm_publish``, ``max_priority``, ``connect_timeout``, ``visibility_timeout``.

    Raises:
        InvalidURL: the URL cannot be used.
        ImproperlyConfigured: an unknown option (the message names the closest known one).
    """

    codec: Codec = CELERY

    def __init__(self, url: str, queues: QueueDeclarations | None = None, **options: Any) -> None:
        self.url = url
        self._url = amqp_url(url)
        _check_options(options)
        self.confirm_publish = bool(options.get("confirm_publish", True))
        self.declarations = queues or QueueDeclarations()
        if self.declarations.max_priority is None and options.get("max_priority") is not None:
            self.declarations = dataclasses.replace(self.declarations, max_priority=options["max_priority"])
        self.connect_timeout = float(options.get("connect_timeout", 10.0))
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._publish_outbox: Outbox | None = None
        self._connect_lock = asyncio.Lock()
        self.layout = Layout(self.declarations, self._scratch)
        self._down = False
        self._marks = Marks(self)
        self._exchanges = AMQPExchanges(self)

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connection is not None:
                return
            with self._errors("connect to"):
                connection = await aio_pika.connect_robust(self._url, timeout=self.connect_timeout)
                try:
                    self._publisher = await connection.channel(
                        publisher_confirms=self.confirm_publish, on_return_raises=self.confirm_publish
                    )
                except BaseException:
                    await connection.close()
                    raise
            connection.reconnect_callbacks.add(self._reconnected)
            connection.close_callbacks.add(self._lost)
            self._connection = connection

    async def aclose(self) -> None:
        connection, self._connection, self._publisher = self._connection, None, None
        self._publish_outbox = None
        self._forget_declarations()
        if connection is not None:
            with self._errors("close the connection to"):
                await connection.close()

    async def channel(self, prefetch: int | None = None, confirms: bool = False) -> AbstractRobustChannel:
        """A new robust channel on this broker's connection (connecting first).

        It is re-opened, with its QoS, robust queues and consumers, after a reconnect. ``prefetch``
        sets its QoS prefetch count; ``confirms`` turns publisher confirms on.

        Raises:
            OperationalError: RabbitMQ cannot be reached.
        """
        connection = await self._ready()
        with self._errors("open a channel on"):
            channel = await connection.channel(publisher_confirms=confirms)
            if prefetch is not None:
                await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def _ready(self) -> AbstractRobustConnection:
        await self.connect()
        assert self._connection is not None
        with self._errors("reach"):
            # After a reconnect the publisher channel is restored a moment after the connection.
            publisher = self._publisher
            ready = self._connection.ready() if publisher is None else publisher.ready()
            await asyncio.wait_for(ready, self.connect_timeout)
        return self._connection

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except _ERRORS as exc:
            text = self._text(exc)
            raise OperationalError(f"Cannot {action} RabbitMQ at {mask_password(self.url)}: {text}") from exc

    def _lost(self, _: object, exc: BaseException | None) -> None:
        """Log a dropped connection once per outage (aio-pika reconnects by itself)."""
        if self._connection is None or exc is None or isinstance(exc, asyncio.CancelledError) or self._down:
            return
        self._down = True
        log.warning(
            "RabbitMQ %s: the connection was lost (%s); reconnecting",
            mask_password(self.url),
            self._text(exc),
        )

    def _reconnected(self, *_: object) -> None:
        self._forget_declarations()
        if self._down:
            self._down = False
            log.info("RabbitMQ %s: reconnected", mask_password(self.url))

    def _text(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if self._url.password and self._url.password != "guest":
            text = text.replace(self._url.password, "**")
        return text

    def _forget_declarations(self, *_: object) -> None:
        self.layout.forget()
        self._exchanges.forget()

    @asynccontextmanager
    async def _scratch(self) -> AsyncIterator[AbstractChannel]:
        # A channel error (an inequivalent redeclare, a missing queue) closes the channel it happens
        # on: keep those off the long-lived channels.
        connection = await self._ready()
        channel = aio_pika.Channel(connection, publisher_confirms=False)
        with self._errors("open a channel on"):
            await channel.initialize()
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        with self._errors("publish to"):
            unroutable = await self._publish_all(envelopes)
            if unroutable:
                # A queue declared before was deleted since: declare again and send those once more.
                self._forget_declarations()
                if await self._publish_all(unroutable):
                    raise OperationalError(f"RabbitMQ could not route {len(unroutable)} message(s).")

    async def _publish_all(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Write every envelope at once and await all confirms; returns the unroutable ones."""
        outbox = await self._outbox()
        now, declared, mandatory = time.time(), self.layout.queues, self.confirm_publish
        futures = []
        for envelope in envelopes:
            if envelope.queue in declared and (envelope.eta is None or envelope.eta <= now):
                exchange, key = "", envelope.queue
            else:
                exchange, key = await self._target(envelope)
            futures.append(
                outbox.publish(exchange, key, _properties(envelope), envelope.body, mandatory, envelope.id)
            )
        outbox.write_now()  # the batch is complete: no need to wait for the next loop turn
        unroutable = []
        for envelope, future in zip(envelopes, futures, strict=True):
            if future is None:
                continue
            try:
                await future
            except aiormq.exceptions.PublishError:
                unroutable.append(envelope)
            except BaseException:
                for rest in futures:
                    if rest is not None:
                        rest.add_done_callback(_retrieve)
                raise
        return unroutable

    async def _outbox(self) -> Outbox:
        """The outbox of the publisher channel as it is now (a new one after a reconnect)."""
        if self._connection is None:
            await self.connect()
        if self._publisher is None:
            raise OperationalError(f"The broker {mask_password(self.url)} is closed.")
        with self._errors("reach"):
            outbox = await Outbox.current(self._publish_outbox, self._publisher, self.connect_timeout)
        self._publish_outbox = outbox
        return outbox

    async def _target(self, envelope: Envelope) -> tuple[str, str]:
        await self.layout.queue(envelope.queue)
        if envelope.eta is None or envelope.eta <= time.time():
            return "", envelope.queue
        ttl = delay_bucket_ms(envelope.eta - time.time())
        return "", await self.layout.delay_queue(envelope.queue, ttl)

    async def dead_letter(self, envelope: Envelope) -> None:
        """Keep ``envelope`` in its queue's dead-letter queue; returns once RabbitMQ confirmed it.

        Raises:
            OperationalError: RabbitMQ could not be reached or did not take the message.
        """
        with self._errors("dead-letter a message on"):
            await self.layout.queue(envelope.queue)
            outbox = await self._outbox()
            dead = f"{envelope.queue}.dead"
            confirmed = outbox.publish(
                "", dead, _properties(envelope), envelope.body, self.confirm_publish, envelope.id
            )
            outbox.write_now()
            if confirmed is not None:
                try:
                    await confirmed
                except aiormq.exceptions.PublishError as exc:
                    self._forget_declarations()  # deleted since it was declared: declare it again next time
                    raise OperationalError(f"The dead-letter queue {dead!r} is gone") from exc

    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return AMQPConsumer(self, queues, prefetch)

    async def purge(self, queue: str) -> int:
        names = [queue, *self.layout.delay_queues(queue)]
        await self._ready()
        with self._errors("purge a queue on"):
            return sum([await self._purge_one(name) for name in names])

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` with its messages, exchange, dead-letter queue and the delay queues known here."""
        delays = self.layout.delay_queues(queue)
        self.layout.forget(queue)
        async with self._scratch() as channel:
            with self._errors("delete a queue on"):
                for name in [queue, f"{queue}.dead", *delays]:
                    await channel.queue_delete(name)
                for name in (queue, f"{queue}.dead"):
                    await channel.exchange_delete(name)

    async def dead_letters(self, queue: str) -> list[Envelope]:
        """The envelopes in ``queue``'s dead-letter queue, oldest first, left in place.

        Each is fetched unacknowledged on a scratch channel; closing the channel puts them all back.
        """
        found: list[Envelope] = []
        async with self._scratch() as channel:
            with self._errors("read dead letters on"):
                dead = await channel.declare_queue(f"{queue}.dead", passive=True)
                while (message := await dead.get(no_ack=False, fail=False)) is not None:
                    found.append(
                        Envelope(
                            message.message_id or message.correlation_id or "",
                            queue,
                            message.body,
                            message.content_type or "",
                            headers=message.headers,
                            reply_to=message.reply_to,
                        )
                    )
        return found

    async def _purge_one(self, name: str) -> int:
        async with self._scratch() as channel:
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return 0
            purged = await declared.purge()
        return int(purged.message_count or 0)

    async def advance(self, key: str, value: float) -> float | None:
        """Raise a mark this connection owns; ``inf`` while another owns it (see :mod:`.amqp_marks`)."""
        return await self._marks.advance(key, value)

    async def broadcast(self, channel: str, data: bytes) -> None:
        await self._ready()
        with self._errors("broadcast on"):
            exchange = await self.layout.broadcast_exchange()
            confirmed = (await self._outbox()).publish(exchange, channel, _NO_PROPERTIES, data)
            if confirmed is not None:
                await confirmed

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        inbox: asyncio.Queue[bytes] = asyncio.Queue()

        async def received(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message.body)

        amqp_channel = await self.channel()
        try:
            with self._errors("subscribe on"):
                exchange = await self.layout.broadcast_exchange()
                queue = await amqp_channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.bind(exchange, channel)
                await queue.consume(received, no_ack=True)
            yield _drain(inbox)
        finally:
            if not amqp_channel.is_closed:
                with self._errors("unsubscribe on"):
                    await amqp_channel.close()

    async def send_to_exchange(self, exchange: Exchange, message: ExchangeMessage) -> None:
        await self._exchanges.send(exchange, message)

    def bind_exchange(
        self, exchange: Exchange, listener: Listener
    ) -> AbstractAsyncContextManager[AsyncIterator[ExchangeMessage]]:
        return self._exchanges.bind(exchange, listener)


def _properties(envelope: Envelope) -> bytes:
    """Celery's properties (kombu's): the content type and encoding, persistent, the task id as
    correlation id, the priority (0 when none); and the id as message id, which RabbitMQ's return of an
    unroutable message is matched by."""
    headers, content_type = envelope.headers, envelope.content_type
    if envelope.eta is not None and (headers is None or "eta" not in headers):
        # A message without Celery's headers: its due time in integer milliseconds.
        headers = {**(headers or {}), ETA_HEADER: math.ceil(envelope.eta * 1000)}
    if envelope.resent:
        headers = {**(headers or {}), RESENT_HEADER: 1}
    return encode_properties(
        content_type=content_type,
        content_encoding=_ENCODINGS.get(content_type, "binary"),
        headers=headers,
        delivery_mode=2,  # persistent
        priority=envelope.priority or 0,
        correlation_id=envelope.id,
        reply_to=envelope.reply_to,
        message_id=envelope.id,
    )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _drain(inbox: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
    while True:
        yield await inbox.get()
