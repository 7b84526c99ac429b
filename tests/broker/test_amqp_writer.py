"""Frames written to the socket at once, in order with aiormq's write queue (amqp_writer), on RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import Connection
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from aqueue.broker import amqp_writer
from aqueue.broker.amqp import AMQPBroker
from aqueue.broker.amqp_wire import Outbox, encode_properties
from tests.broker.test_amqp import URL, broker, envelopes, get_one, queue, ready_count, until
from tests.conftest import require_server

__all__ = ["broker", "queue"]  # the fixtures of test_amqp, used here too

HEARTBEAT = pamqp.frame.marshal(Heartbeat(), 0)


@pytest.fixture
async def connection() -> AsyncIterator[Connection]:
    require_server("amqp")
    opened = await aiormq.connect(URL)
    try:
        yield opened
    finally:
        await opened.close()


def publish_frames(channel: int, queue: str, message_id: str, body: bytes) -> bytes:
    """A publish to ``queue`` through the default exchange, marshalled by pamqp."""
    properties = spec.Basic.Properties(message_id=message_id, delivery_mode=2)
    return b"".join(
        pamqp.frame.marshal(frame, channel)
        for frame in (
            spec.Basic.Publish(exchange="", routing_key=queue),
            ContentHeader(0, len(body), properties),
            ContentBody(body),
        )
    )


def test_aiormqs_writer_keeps_its_stream_writer_on_the_connection() -> None:
    # Given the aiormq this runs with (amqp_wire installs the writer at import); Then it is installed
    assert amqp_writer.install()


async def test_the_stream_writer_is_there_while_the_connection_is_open_and_gone_after(
    connection: Connection,
) -> None:
    # Given an open connection; Then its writer task's stream writer is found, and a write goes out
    assert amqp_writer.stream(connection) is not None
    assert amqp_writer.write(connection, HEARTBEAT)
    # When it closes; Then there is no stream writer any more, and nothing is written
    await connection.close()
    assert amqp_writer.stream(connection) is None
    assert not amqp_writer.write(connection, HEARTBEAT)


async def test_a_write_with_the_queue_empty_goes_to_the_socket_at_once(connection: Connection) -> None:
    # Given the stream writer of an open connection, recording its writes
    stream = amqp_writer.stream(connection)
    assert stream is not None
    writes: list[bytes] = []
    write = stream.write

    def recorded(data: Any) -> None:
        writes.append(bytes(data))
        write(data)

    stream.write = recorded  # type: ignore[method-assign]
    # When a heartbeat is written with nothing in aiormq's write queue; Then it is written before any yield
    assert connection.write_queue.empty()
    assert amqp_writer.write(connection, HEARTBEAT)
    assert writes == [HEARTBEAT]


async def test_a_write_behind_frames_in_the_write_queue_is_refused_until_they_are_written(
    connection: Connection,
) -> None:
    # Given a frame in aiormq's write queue, not written yet
    connection.write_queue.put_nowait(ChannelFrame(HEARTBEAT, False))
    # When writing; Then the write is refused (it would pass the queued frame)
    assert not amqp_writer.write(connection, HEARTBEAT)
    # And once aiormq's writer task has written the queue out, writes go straight out again
    await until(_true(connection.write_queue.empty))
    assert amqp_writer.write(connection, HEARTBEAT)


async def test_while_the_connection_closes_nothing_is_written(connection: Connection) -> None:
    # Given an open connection whose writer task was just told to stop (aiormq's close: it then sends
    # Connection.Close, the last frame)
    connection._writer_task.cancel()
    # When writing; Then the write is refused
    assert not amqp_writer.write(connection, HEARTBEAT)


async def test_outbox_publishes_keep_their_order_with_frames_aiormq_queued_before(
    broker: AMQPBroker, queue: str
) -> None:
    # Given an outbox on a channel without confirms, after a publish declared the queue
    await broker.publish(envelopes(queue, 1))
    assert await get_one(broker, queue) is not None
    channel = await broker.channel()
    raw = await channel.get_underlay_channel()
    assert isinstance(raw, aiormq.Channel)
    outbox = Outbox(raw)
    # When a publish sits in aiormq's write queue and the outbox then publishes and writes at once
    raw.write_queue.put_nowait(ChannelFrame(publish_frames(raw.number, queue, "first", b"1"), False))
    outbox.publish("", queue, encode_properties(message_id="second"), b"2")
    outbox.write_now()
    # Then RabbitMQ got the queued one first
    await until(lambda: _equals(ready_count(broker, queue), 2))
    got = [await get_one(broker, queue) for _ in range(2)]
    assert [m.message_id if m else None for m in got] == ["first", "second"]
    await channel.close()


def test_an_aiormq_writer_of_another_shape_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an aiormq whose writer task takes other arguments
    async def other(self: Connection, writer: Any, frames: Any) -> None:
        raise AssertionError("not called")

    monkeypatch.setattr(amqp_writer, "_aiormq_writer", other)
    monkeypatch.setattr(Connection, "_Connection__writer", other)
    # When installing; Then it is refused, and aiormq's writer stays
    assert not amqp_writer.install()
    assert Connection._Connection__writer is other  # type: ignore[attr-defined]


def _true(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
