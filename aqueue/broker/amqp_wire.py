"""Frames on one aiormq channel, written together once per event-loop turn.

aiormq sends each publish and each acknowledgement as its own write, through an ``asyncio.Queue`` hop
and a drain, and aio-pika adds a ``Message`` object per publish; on the hot path that per-message
machinery costs more CPU than the rest of aqueue. An :class:`Outbox` instead gathers what its owner
sends during one loop turn (publishes, acks, nacks), marshals it into one piece at the end of that turn
and writes it once: straight to the socket when aiormq's write queue is empty
(:mod:`aqueue.broker.amqp_writer`), else onto that queue:

- publishes take their delivery tags under the channel's lock, as aiormq's own ``basic_publish``
  does, so the two may share a channel; each gets a future that the publisher confirm (or the
  ``basic.return`` of an unroutable mandatory message) settles;
- acknowledgements are coalesced: the acks below the oldest delivery still unsettled go as one
  ``multiple`` ack of the highest of them (an ack not written yet: RabbitMQ refuses a multiple ack
  that settles nothing), those above it one by one; nacks are written first, so a multiple ack never
  covers a delivery meant for the dead-letter queue or for requeueing. Only unsettled tags are kept,
  so the bookkeeping stays within the consumer's prefetch however long one delivery stays open.

The frames of publishes, acks and nacks are encoded here with ``struct`` (``encode_properties`` for
the content header's properties); what comes out is byte for byte what pamqp marshals, at a
fraction of the cost, except the headers table, which is laid out as py-amqp (Celery's client) lays
it out (:mod:`aqueue.broker.amqp_table`). Other frames still go through aiormq.

An outbox belongs to one aiormq channel. When that channel closes, the futures of publishes not yet
confirmed fail with ``ChannelInvalidStateError``; acknowledgements not yet written are dropped, and
RabbitMQ delivers those messages again. This module uses aiormq's channel internals (its lock,
delivery-tag counter, confirmation table and write queue), hence the pin of aiormq's minor version in
``pyproject.toml`` (:data:`SUPPORTED_AIORMQ`) and :func:`check_aiormq` at import, which refuses an aiormq
whose channel lacks them rather than let publisher confirms break silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

from aio_pika.abc import AbstractRobustChannel
from aiormq import Channel
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError

from aqueue.broker import amqp_reader, amqp_writer
from aqueue.broker.amqp_table import encode_table
from aqueue.exceptions import ImproperlyConfigured

__all__ = ["SUPPORTED_AIORMQ", "Outbox", "check_aiormq", "encode_properties"]

log = logging.getLogger(__name__)

_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME = struct.Struct(">BHI")
_FRAME_END = b"\xce"
_PUBLISH = struct.Struct(">HHH").pack(60, 40, 0)  # basic.publish, reserved-1
_CONTENT = struct.Struct(">HHQ")  # class basic, weight 0, body size
_ACK = struct.Struct(">HHQB")
_FLAGS = struct.Struct(">H")
_OCTET = struct.Struct(">B")
_MAX_ROUTES = 4096
"""Method frames of publishes kept, per (exchange, routing key, mandatory); past this the cache restarts."""

SUPPORTED_AIORMQ = ">=7.2,<7.3"
"""The aiormq releases whose channel internals the outbox is written against (the pin in pyproject.toml)."""
_CHANNEL_PROPERTIES = ("lock", "closing", "is_closed")
_CHANNEL_ATTRIBUTES = (
    "number",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "publisher_confirms",
    "max_content_size",
)
"""Set by ``Channel.__init__``: looked for among the names its code assigns."""
_FRAME_FIELDS = ("payload", "should_close")

_Publish = tuple[bytes, "asyncio.Future[Any] | None", str | None]
"""The frames of a publish, the future of its confirm, and its message id when it is mandatory."""


def _short(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {text[:40]!r}...")
    return _OCTET.pack(len(data)) + data


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + _FRAME_END


_PROPERTY_CODES: tuple[tuple[int, Callable[[Any], bytes]], ...] = (
    (0x8000, _short),  # content-type
    (0x4000, _short),  # content-encoding
    (0x2000, encode_table),  # headers
    (0x1000, _OCTET.pack),  # delivery-mode
    (0x0800, _OCTET.pack),  # priority
    (0x0400, _short),  # correlation-id
    (0x0200, _short),  # reply-to
    (0x0100, _short),  # expiration
    (0x0080, _short),  # message-id
    (0x0020, _short),  # type
)
"""Flag bit and encoder of each property encode_properties() takes, in AMQP's order (the others unused)."""


def encode_properties(
    *,
    content_type: str | None = None,
    content_encoding: str | None = None,
    headers: Mapping[str, Any] | None = None,
    delivery_mode: int | None = None,
    priority: int | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    expiration: str | None = None,
    message_id: str | None = None,
    message_type: str | None = None,
) -> bytes:
    """The property flags and property list of a basic content header, as AMQP 0-9-1 lays them out."""
    values = (
        content_type,
        content_encoding,
        headers,
        delivery_mode,
        priority,
        correlation_id,
        reply_to,
        expiration,
        message_id,
        message_type,
    )
    flags, parts = 0, []
    for value, (flag, encode) in zip(values, _PROPERTY_CODES, strict=True):
        if value is not None:
            flags |= flag
            parts.append(encode(value))
    return _FLAGS.pack(flags) + b"".join(parts)


def check_aiormq(
    channel: type[Any] = Channel, frame: type[Any] = ChannelFrame, version: str | None = None
) -> None:
    """Check that aiormq's ``channel`` and ``frame`` classes have the internals the outbox uses.

    Parameters:
        channel: aiormq's ``Channel`` class.
        frame: aiormq's ``ChannelFrame`` class (what goes on the connection's write queue).
        version: the aiormq version to name in the error (by default the installed one).

    Raises:
        ImproperlyConfigured: something is missing; the message names it and the supported aiormq releases.
    """
    missing = [f"Channel.{name}" for name in _CHANNEL_PROPERTIES if not hasattr(channel, name)]
    assigned = getattr(getattr(channel.__init__, "__code__", None), "co_names", ())
    missing += [f"Channel.{name}" for name in _CHANNEL_ATTRIBUTES if name not in assigned]
    fields = {field.name for field in dataclasses.fields(frame)} if dataclasses.is_dataclass(frame) else set()
    missing += [f"ChannelFrame.{name}" for name in _FRAME_FIELDS if name not in fields]
    if missing:
        version = version or _installed_version("aiormq")
        raise ImproperlyConfigured(
            f"aqueue's AMQP transport supports aiormq{SUPPORTED_AIORMQ}, and aiormq {version} is installed, "
            f"which lacks {', '.join(missing)}. Install a supported one: pip install 'aiormq{SUPPORTED_AIORMQ}'"
        )


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


check_aiormq()
amqp_writer.install()


class Outbox:
    """Publishes, acks and nacks for ``channel``, each loop turn's worth written as one piece."""

    __slots__ = (
        "_acks",
        "_fills",
        "_flushing",
        "_loop",
        "_max_body",
        "_nacks",
        "_publishes",
        "_routes",
        "_soon",
        "_unsettled",
        "_writing",
        "channel",
    )

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._publishes: list[_Publish] = []
        self._fills: list[Callable[[Outbox], None]] = []
        self._routes: dict[tuple[str, str, bool], bytes] = {}
        self._max_body = channel.max_content_size
        self._nacks: list[bytes] = []
        self._acks: list[int] = []
        """Tags acknowledged since the last write."""
        self._unsettled: dict[int, None] = {}
        """Tags received and not settled yet, oldest first (at most the consumer's prefetch)."""
        self._flushing: asyncio.Task[None] | None = None
        """The task writing what could not be written at once (the channel's lock or write queue was taken)."""
        self._soon = False
        """Whether this loop turn's frames are to be written at its end (``_write_soon`` is scheduled)."""
        self._writing = False
        channel.closing.add_done_callback(self._closed)
        if channel.publisher_confirms:
            amqp_reader.take_confirms(channel)  # settled as they come, without the channel reader's turn

    @classmethod
    async def current(cls, outbox: Outbox | None, channel: AbstractRobustChannel, timeout: float) -> Outbox:
        """``outbox`` while its channel is open, else one for the robust ``channel``'s aiormq channel now.

        Waits up to ``timeout`` seconds for ``channel`` to be restored after a reconnect.
        """
        if outbox is not None and not outbox.closed:
            return outbox
        await asyncio.wait_for(channel.ready(), timeout)
        raw = await channel.get_underlay_channel()
        if outbox is not None and outbox.channel is raw:
            return outbox
        return cls(cast(Channel, raw))

    @property
    def closed(self) -> bool:
        return self.channel.is_closed

    def publish(
        self,
        exchange: str,
        routing_key: str,
        properties: bytes,
        body: bytes,
        mandatory: bool = False,
        message_id: str | None = None,
    ) -> asyncio.Future[Any] | None:
        """Queue a publish; its future (None without publisher confirms) completes once RabbitMQ confirmed it.

        ``properties`` come from :func:`encode_properties`; a mandatory message needs its
        ``message_id`` here too, to match RabbitMQ's return of it. The future fails with
        ``aiormq.exceptions.PublishError`` when a mandatory message was returned unroutable,
        ``DeliveryError`` when RabbitMQ refused it, ``ChannelInvalidStateError`` when the channel
        closed first.

        Raises:
            ChannelInvalidStateError: the channel is closed.
        """
        self._check()
        channel = self.channel.number
        route = (exchange, routing_key, mandatory)
        method = self._routes.get(route)
        if method is None:
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            payload = _PUBLISH + _short(exchange) + _short(routing_key) + (b"\x01" if mandatory else b"\x00")
            method = self._routes[route] = _frame(_METHOD, channel, payload)
        header = _frame(_HEADER, channel, _CONTENT.pack(60, 0, len(body)) + properties)
        if not body:
            frames = method + header
        elif len(body) <= self._max_body:
            frames = method + header + _FRAME.pack(_BODY, channel, len(body)) + body + _FRAME_END
        else:
            step = self._max_body
            chunks = (_frame(_BODY, channel, body[i : i + step]) for i in range(0, len(body), step))
            frames = method + header + b"".join(chunks)
        future = self._loop.create_future() if self.channel.publisher_confirms else None
        self._publishes.append((frames, future, message_id if mandatory else None))
        self._schedule()
        return future

    def before_write(self, fill: Callable[[Outbox], None]) -> None:
        """Have ``fill(self)`` called just before the next write, to queue publishes that go with it.

        If the channel closes first, ``fill`` is called then, and its publishes raise.

        Raises:
            ChannelInvalidStateError: the channel is closed.
        """
        self._check()
        self._fills.append(fill)
        self._schedule()

    def delivered(self, tag: int) -> None:
        """Note a delivery received on this channel (to be settled later by ``ack`` or ``nack``)."""
        self._unsettled[tag] = None

    def ack(self, tag: int) -> None:
        """Acknowledge delivery ``tag``.

        Raises:
            ChannelInvalidStateError: the channel is closed (RabbitMQ delivers the message again).
        """
        self._check()
        self._unsettled.pop(tag, None)
        self._acks.append(tag)
        self._schedule()

    def nack(self, tag: int, requeue: bool) -> None:
        """Give delivery ``tag`` back (``requeue``) or dead-letter it.

        Raises:
            ChannelInvalidStateError: the channel is closed (RabbitMQ delivers the message again).
        """
        self._check()
        self._unsettled.pop(tag, None)
        self._nacks.append(_frame(_METHOD, self.channel.number, _ACK.pack(60, 120, tag, 2 if requeue else 0)))
        self._schedule()

    async def flush(self) -> None:
        """Write everything queued so far now (for instance before closing the channel)."""
        self._write_soon()
        while self._flushing is not None and not self.channel.is_closed:
            await asyncio.shield(self._flushing)

    def _check(self) -> None:
        if self.channel.is_closed:
            raise ChannelInvalidStateError(f"channel {self.channel} is closed")

    def _schedule(self) -> None:
        if self._flushing is None and not self._soon:
            self._soon = True
            self._loop.call_soon(self._write_soon)

    def _write_soon(self) -> None:
        """Write this loop turn's frames: at once where nothing needs waiting for, else from a task."""
        if not self._soon:
            return
        self._soon = False
        if self._flushing is None and not self.write_now():
            self._flushing = self._loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._fills or self._publishes or self._acks or self._nacks:
                self._run_fills()
                frames = self._nacks
                self._nacks = []
                frames += self._ack_frames()
                if self._publishes:
                    try:
                        await self._write_publishes(frames)
                    except Exception:
                        continue  # their futures have failed with the reason; the channel is closing
                elif not self.channel.is_closed:
                    self._writing = True  # write_now must not pass these (a multiple ack could)
                    try:
                        await self._put(b"".join(frames))
                    finally:
                        self._writing = False
        finally:
            self._flushing = None

    def _run_fills(self) -> None:
        fills, self._fills = self._fills, []
        for fill in fills:
            try:
                fill(self)
            except Exception:
                log.exception("Queuing publishes for channel %s failed", self.channel)

    def _ack_frames(self) -> list[bytes]:
        acks = self._acks
        if not acks:
            return []
        self._acks = []
        oldest = next(iter(self._unsettled), None)
        if oldest is None:
            below, above = acks, []
        else:
            below = [tag for tag in acks if tag < oldest]
            above = sorted(tag for tag in acks if tag > oldest)
        # Every tag below the oldest unsettled one is settled: one multiple ack covers those not written yet.
        channel = self.channel.number
        frames = [_frame(_METHOD, channel, _ACK.pack(60, 80, max(below), 1))] if below else []
        frames += [_frame(_METHOD, channel, _ACK.pack(60, 80, tag, 0)) for tag in above]
        return frames

    async def _write_publishes(self, frames: list[bytes]) -> None:
        publishes, self._publishes = self._publishes, []
        channel = self.channel
        self._writing = True
        try:
            async with channel.lock:
                first = self._number(publishes, frames)
                try:
                    await self._put(b"".join(frames))
                except BaseException:
                    self._unnumber(first)  # nothing was written: the tags are free again
                    raise
        except BaseException as exc:
            reason = exc if isinstance(exc, Exception) else ChannelInvalidStateError("publish interrupted")
            _fail([future for _, future, _ in publishes], reason)
            raise
        finally:
            self._writing = False

    def _number(self, publishes: list[_Publish], frames: list[bytes]) -> int:
        """Give ``publishes`` the channel's next delivery tags and add their frames; returns the tag before."""
        channel = self.channel
        first = tag = channel.delivery_tag
        confirmations, ids = channel.confirmations, channel.message_id_delivery_tag
        for data, future, message_id in publishes:
            tag += 1
            frames.append(data)
            if future is not None:
                confirmations[tag] = future
                if message_id:
                    ids[message_id] = tag
                    future.add_done_callback(_forget(ids, message_id, tag))
        channel.delivery_tag = tag
        return first

    def _unnumber(self, first: int) -> None:
        channel = self.channel
        for unused in range(first + 1, channel.delivery_tag + 1):
            channel.confirmations.pop(unused, None)
        channel.delivery_tag = first

    async def _put(self, data: bytes) -> None:
        if not amqp_writer.write(self.channel.connection, data):
            await self.channel.write_queue.put(ChannelFrame(data, False))

    def write_now(self) -> bool:
        """Write what is queued at once when that needs no waiting; returns whether it did.

        If it did not, the flush task writes it. For a caller that has gathered its batch already: it
        saves the loop turn to the end of this one. Safe because every publish on this channel goes
        through this outbox (aiormq's own publishes take the channel lock, which ``_writing`` stands
        for here). The frames go to the socket straight away when aiormq's write queue is empty
        (:mod:`aqueue.broker.amqp_writer`), else onto that queue.
        """
        queue = self.channel.write_queue
        if self._writing or queue.full() or self.channel.is_closed:
            return False
        self._run_fills()
        frames = self._nacks
        self._nacks = []
        frames += self._ack_frames()
        if self._publishes:
            publishes, self._publishes = self._publishes, []
            self._number(publishes, frames)
        if frames:
            data = b"".join(frames)
            if not amqp_writer.write(self.channel.connection, data):
                queue.put_nowait(ChannelFrame(data, False))
        return True

    def _closed(self, closing: asyncio.Future[Any]) -> None:
        reason = ChannelInvalidStateError(f"channel {self.channel} closed: {_reason(closing)}")
        self._run_fills()
        pending = [future for _, future, _ in self._publishes]
        pending += [f for f in self.channel.confirmations.values() if isinstance(f, asyncio.Future)]
        _fail(pending, reason)
        self._publishes.clear()
        self._acks.clear()
        self._nacks.clear()


def _fail(futures: list[asyncio.Future[Any] | None], reason: Exception) -> None:
    for future in futures:
        if future is not None and not future.done():
            future.set_exception(reason)
            future.exception()  # whoever awaits it still gets it; nobody else logs it at collection


def _forget(ids: dict[str, int], message_id: str, tag: int) -> Any:
    def forget(_: asyncio.Future[Any]) -> None:
        if ids.get(message_id) == tag:
            del ids[message_id]

    return forget


def _reason(closing: asyncio.Future[Any]) -> str:
    if closing.cancelled():
        return "cancelled"
    exc = closing.exception()
    return (str(exc) or type(exc).__name__) if exc is not None else "closed"
