"""Frames read, and deliveries handed over, with less machinery than aiormq uses.

aiormq reads every frame with three ``readexactly`` calls into a ``BytesIO`` under a lock, and hands
every delivery to its consumer callback as a new task. On a busy connection (a burst of deliveries, a
worker's prefetch, confirms, the replies of rpc://) the bytes of many frames already sit in the
stream's buffer, and aqueue's consumers do no I/O of their own. So:

- :func:`install` gives aiormq's ``FrameReceiver`` a ``get_frame`` that slices a frame out of the
  stream's buffer at once when all of it is there, and otherwise reads it with aiormq's own code (the
  handshake, a frame split across reads, the end of the stream, a connection that failed, and their
  errors).
- :func:`consume` starts a consumer whose callback is a plain function, called by the channel's
  reader as soon as a delivery's frames are in: no task per delivery. A callback that raises is
  logged, as aiormq logs a consumer task that failed, and the channel goes on.

Both rely on internals (the frame receiver's ``reader``, ``lock`` and ``started``; the stream reader's
buffer; the channel's ``_get_frame`` and ``_on_deliver_frame``) of the aiormq release pinned in
``pyproject.toml``, checked before use: where one is missing, aiormq's own code is used.
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

__all__ = ["OnMessage", "callbacks", "consume", "install"]

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
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            callback(DeliveredMessage(delivery=frame, header=header, body=body, channel=channel))
        except Exception:
            log.exception("Consumer callback failed")

    channel._on_deliver_frame = on_deliver  # type: ignore[method-assign]
    return plain
