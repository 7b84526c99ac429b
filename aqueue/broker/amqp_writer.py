"""Frames written to the connection's socket at once, when that keeps them in order with aiormq's.

aiormq writes every frame through its connection's write queue: a ``put`` that wakes the writer task,
which then writes to the socket. On a connection where one message at a time goes out (a client
awaiting each ``delay()``, a worker acknowledging and replying to one task) that hop is a loop turn per
write. :func:`install` has aiormq's writer task keep its stream writer on the connection, and
:func:`write` writes to it directly when the write queue is empty: every frame put there before has
then been written already (aiormq's writer takes a frame from the queue and writes it in one step), so
the order on the wire is the order of the calls. Otherwise, or without the stream writer, it returns
False and the caller puts its frames on the queue as aiormq does.

This relies on aiormq's ``Connection.__writer`` taking the stream writer as its argument and running
as the connection's ``_writer_task`` (cancelled to close the connection, when it writes
``Connection.Close`` last), in the aiormq release pinned in ``pyproject.toml``, checked by
:func:`install`.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from aiormq.connection import Connection

__all__ = ["install", "stream", "write"]

_STREAM = "_aqueue_stream_writer"
"""The connection attribute holding its writer task's stream writer while that task runs."""

_aiormq_writer: Any = getattr(Connection, "_Connection__writer", None)


async def _writer(self: Connection, writer: asyncio.StreamWriter) -> None:
    """aiormq's writer task, with its stream writer kept on the connection while it runs."""
    self.__dict__[_STREAM] = writer
    try:
        await _aiormq_writer(self, writer)
    finally:
        if self.__dict__.get(_STREAM) is writer:
            del self.__dict__[_STREAM]


def install() -> bool:
    """Have aiormq's writer task keep its stream writer where :func:`write` finds it; returns whether it does."""
    if _aiormq_writer is None:
        return False
    if Connection._Connection__writer is _writer:  # type: ignore[attr-defined]
        return True
    if list(inspect.signature(_aiormq_writer).parameters) != ["self", "writer"] or "_writer_task" not in (
        Connection.__annotations__
    ):
        return False
    Connection._Connection__writer = _writer  # type: ignore[attr-defined]
    return True


def stream(connection: Any) -> asyncio.StreamWriter | None:
    """The stream writer of ``connection``'s writer task while that runs (None before and after)."""
    writer: asyncio.StreamWriter | None = connection.__dict__.get(_STREAM)
    return writer


def write(connection: Any, data: bytes) -> bool:
    """Write ``data`` to ``connection``'s socket now, if nothing waits in its write queue; returns whether it did."""
    writer = stream(connection)
    if writer is None or not connection.write_queue.empty() or writer.is_closing():
        return False
    task: asyncio.Task[Any] | None = getattr(connection, "_writer_task", None)
    if task is None or task.cancelling() or connection.is_closed:
        return False  # closing: aiormq's writer sends Connection.Close, which must be the last frame
    writer.write(data)
    return True
