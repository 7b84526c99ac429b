"""Frames read, and deliveries handed over, with less machinery than aiormq uses.

aiormq reads every frame with three ``readexactly`` calls into a ``BytesIO`` under a lock, and hands
every delivery to its consumer callback as a new task. On a busy connection (a burst of deliveries, a
worker's prefetch, confirms, the replies of rpc://) the bytes of many frames already sit in the
stream's buffer, and aqueue's consumers do no I/O of their own. So:

- :func:`install` gives aiormq's ``FrameReceiver`` a ``get_frame`` that slices a frame out of the
  stream's buffer at once when all of it is there, and otherwise reads it with aiormq's own code (the
  handshake, a frame split across reads, the end of the stream, a connection that failed, and their
  errors).
- :func:`consume` starts a consumer whose callback is a plain function, called as soon as a
  delivery's frames are in: no task per delivery. A callback that raises is logged, as aiormq logs a
  consumer task that failed, and the channel goes on.
- aiormq's connection reader puts every frame on its channel's queue, and the channel's reader task
  takes it from there: a loop turn between the socket and the callback. On a channel :func:`consume`
  started a plain callback on, or whose publisher confirms an :class:`~aqueue.broker.amqp_wire.Outbox`
  waits for (:func:`take_confirms`), deliveries to plain callbacks and publisher confirms are handled
  as the connection's reader puts them, but only while the channel's reader waits idle for its next
  frame with nothing queued before them: so in the order they came, after everything before them.
  Everything else, and those whenever frames wait in the queue, go through the queue and the
  channel's reader as before.

These rely on internals (the frame receiver's ``reader``, ``lock`` and ``started``; the stream reader's
buffer; the channel's ``_get_frame``, ``_on_deliver_frame``, ``frames`` queue and
``_confirm_delivery``; ``asyncio.Queue``'s ``_queue`` and ``_getters``) of the aiormq release pinned in
``pyproject.toml`` and of asyncio, checked before use: where one is missing, aiormq's own code is used.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import pamqp.frame
from aiormq import Channel
from aiormq.abc import DeliveredMessage
from aiormq.connection import FrameReceiver
from aiormq.exceptions import InvalidFrameError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

from aqueue.ids import new_id

__all__ = ["OnMessage", "callbacks", "consume", "install", "take_confirms"]

log = logging.getLogger(__name__)

OnMessage = Callable[[DeliveredMessage], None]
"""A consumer callback that does no I/O: called with each delivery, from the channel's reader."""

_SIZE = struct.Struct(">I")
_HEAD = 7
"""A frame's type, channel and payload size; the frame-end octet follows the payload."""

_aiormq_get_frame = FrameReceiver.get_frame


async def get_frame(self: FrameReceiver) -> Any:
    """``FrameReceiver.get_frame``: the next frame, sliced out of the buffer when all of it is there."""
    reader = self.reader
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    if self.started and len(buffer) >= _HEAD and reader.exception() is None and not self.lock.locked():
        end = _HEAD + _SIZE.unpack_from(buffer, 3)[0] + 1
        if len(buffer) >= end:
            data = bytes(buffer[:end])
            del buffer[:end]
            reader._maybe_resume_transport()  # type: ignore[attr-defined]
            try:
                return pamqp.frame.unmarshal(data)
            except PAMQPException as exc:
                raise InvalidFrameError(str(exc)) from exc
    return await _aiormq_get_frame(self)


def _assigns(init: Any, names: tuple[str, ...]) -> bool:
    assigned = getattr(getattr(init, "__code__", None), "co_names", ())
    return all(name in assigned for name in names)


def install() -> bool:
    """Have aiormq's frame receiver use :func:`get_frame`; returns whether it does.

    Only while ``FrameReceiver`` and ``asyncio.StreamReader`` have the internals it reads.
    """
    if FrameReceiver.get_frame is get_frame:
        return True
    if (
        FrameReceiver.get_frame is not _aiormq_get_frame
        or not _assigns(FrameReceiver.__init__, ("reader", "started", "lock"))
        or not _assigns(asyncio.StreamReader.__init__, ("_buffer",))
        or not callable(getattr(asyncio.StreamReader, "_maybe_resume_transport", None))
    ):
        return False
    FrameReceiver.get_frame = get_frame  # type: ignore[method-assign]
    FrameReceiver.__anext__ = get_frame  # type: ignore[method-assign]
    return True


_DIRECT = callable(getattr(Channel, "_on_deliver_frame", None)) and callable(
    getattr(Channel, "_get_frame", None)
)
"""Whether aiormq's channel reads deliveries the way :func:`_direct` replaces."""
_CALLBACKS = "_aqueue_callbacks"
"""The channel attribute holding :func:`consume`'s plain callbacks."""


async def consume(
    channel: Channel, queue: str, on_message: OnMessage, *, no_ack: bool = False
) -> spec.Basic.ConsumeOk:
    """``channel.basic_consume(queue, ...)``, with ``on_message`` called straight from the channel's reader."""
    tag = f"ctag{channel.number}.{new_id()}"
    started = _direct(channel) if _DIRECT else {}
    started[tag] = on_message
    _route(channel)

    async def in_a_task(message: DeliveredMessage) -> None:  # aiormq's way, where _direct is not in use
        on_message(message)

    try:
        return await channel.basic_consume(queue, in_a_task, no_ack=no_ack, consumer_tag=tag)
    except BaseException:
        started.pop(tag, None)
        raise


def callbacks(channel: Channel) -> dict[str, OnMessage]:
    """The callbacks :func:`consume` started on ``channel``, by consumer tag (none if it started none)."""
    found: dict[str, OnMessage] = channel.__dict__.get(_CALLBACKS, {})
    return found


def take_confirms(channel: Channel) -> bool:
    """Have ``channel``'s publisher confirms settled as they come (see the module's docstring); returns
    whether they are."""
    router = _route(channel)
    if router is None:
        return False
    router.confirms = bool(channel.publisher_confirms)
    return router.confirms


def _route(channel: Channel) -> _Router | None:
    """The router of ``channel``'s frame queue, put in place by the first call."""
    frames = channel.__dict__.get("frames")
    if not _ROUTABLE or not isinstance(frames, asyncio.Queue) or type(frames) not in (asyncio.Queue, _Frames):
        return None
    router: _Router | None = frames.__dict__.get(_ROUTER)
    if router is None:
        router = frames.__dict__[_ROUTER] = _Router(channel, frames)
        frames.__class__ = _Frames
    return router


class _Router:
    """Takes a channel's deliveries to plain callbacks, and its confirms, off its frame queue."""

    __slots__ = ("_content", "_frames", "channel", "confirms")

    def __init__(self, channel: Channel, frames: asyncio.Queue[Any]) -> None:
        self.channel = channel
        self.confirms = False
        self._frames = frames
        self._content: list[Any] | None = None
        """The delivery being read: its Deliver frame, callback, content header, body parts, size read."""

    def take(self, frame: Any) -> bool:
        """Handle ``frame`` now and return True, or return False to leave it to the channel's reader."""
        if self._content is not None:
            return self._more(frame)
        if self._frames._queue or not _waits(self._frames):  # type: ignore[attr-defined]
            return False  # frames before this one are still to be handled: after them, in order
        kind = type(frame)
        if kind is spec.Basic.Deliver:
            callback = callbacks(self.channel).get(frame.consumer_tag or "")
            if callback is None:
                return False
            self._content = [frame, callback, None, [], 0]
            return True
        if (kind is spec.Basic.Ack or kind is spec.Basic.Nack) and self.confirms:
            self._confirm(frame)
            return True
        return False

    def _more(self, frame: Any) -> bool:
        content = self._content
        assert content is not None
        if content[2] is None:
            if not isinstance(frame, ContentHeader):
                return self._unexpected(frame)
            content[2] = frame
        elif isinstance(frame, ContentBody):
            if frame.value:
                content[3].append(frame.value)
                content[4] += len(frame.value)
            else:
                content[4] = content[2].body_size
        else:
            return self._unexpected(frame)
        if content[4] >= (content[2].body_size or 0):
            self._content = None
            deliver, callback, header, parts = content[:4]
            _hand_over(self.channel, callback, deliver, header, parts)
        return True

    def _unexpected(self, frame: Any) -> bool:
        deliver = self._content[0] if self._content else None
        self._content = None
        log.error("Unexpected frame %r in the content of %r on channel %s", frame, deliver, self.channel)
        return False

    def _confirm(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        """What aiormq's ``Channel._on_confirm_frame`` does, without its loop turn."""
        channel, tag = self.channel, frame.delivery_tag
        if tag not in channel.confirmations:
            log.error("Unexpected confirmation frame %r from broker", frame)
            return
        tags = [t for t in channel.confirmations if t <= tag] if frame.multiple else [tag]
        for settled in tags:
            channel._confirm_delivery(settled, frame)


def _waits(frames: asyncio.Queue[Any]) -> bool:
    """Whether a reader waits on ``frames``'s ``get()`` (the channel's reader, idle)."""
    return any(not getter.done() for getter in frames._getters)  # type: ignore[attr-defined]


_ROUTER = "_aqueue_router"


class _Frames(asyncio.Queue):  # type: ignore[type-arg]
    """A channel's frame queue with a :class:`_Router` (the class a queue's ``__class__`` becomes)."""

    def put_nowait(self, item: Any) -> None:
        router: _Router = self.__dict__[_ROUTER]
        if not router.take(item[1]):
            super().put_nowait(item)


_ROUTABLE = (
    callable(getattr(Channel, "_confirm_delivery", None))
    and _assigns(Channel.__init__, ("frames", "confirmations", "publisher_confirms"))
    and _assigns(asyncio.Queue.__init__, ("_getters",))
    and _assigns(asyncio.Queue._init, ("_queue",))
)
"""Whether aiormq's channel and asyncio's queue have what :class:`_Router` uses."""


def _direct(channel: Channel) -> dict[str, OnMessage]:
    """The plain callbacks of ``channel`` by consumer tag; its reader calls them without a task."""
    plain: dict[str, OnMessage] | None = channel.__dict__.get(_CALLBACKS)
    if plain is not None:
        return plain
    plain = channel.__dict__[_CALLBACKS] = {}
    next_frame = channel._get_frame
    in_tasks = channel._on_deliver_frame

    async def on_deliver(frame: spec.Basic.Deliver) -> None:
        callback = plain.get(frame.consumer_tag) if frame.consumer_tag is not None else None
        if callback is None:
            await in_tasks(frame)
            return
        header = await next_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
        size, parts, got = header.body_size, [], 0
        while got < size:
            content = await next_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r}", content)
            if not content.value:
                break
            parts.append(content.value)
            got += len(content.value)
        _hand_over(channel, callback, frame, header, parts)

    channel._on_deliver_frame = on_deliver  # type: ignore[method-assign]
    return plain


def _hand_over(
    channel: Channel,
    callback: OnMessage,
    deliver: spec.Basic.Deliver,
    header: ContentHeader,
    parts: list[bytes],
) -> None:
    """Call ``callback`` with the delivery whose body came in ``parts``; log what it raises."""
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    try:
        callback(DeliveredMessage(delivery=deliver, header=header, body=body, channel=channel))
    except Exception:
        log.exception("Consumer callback failed")
