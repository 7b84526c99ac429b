"""Frames sliced out of the stream's buffer, and deliveries handed to plain callbacks (amqp_reader)."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

import aiormq
import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands as spec
from pamqp.heartbeat import Heartbeat

from aqueue.broker import amqp_reader
from aqueue.broker.amqp_table import encode_table
from aqueue.broker.amqp_wire import Outbox, encode_properties
from aqueue.message import Message
from aqueue.protocol import CeleryCodec
from aqueue.serialization import get_serializer
from tests.broker.test_amqp import URL
from tests.conftest import require_server

_FRAME = struct.Struct(">BHI")


def raw_frame(kind: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + end


def task_delivery(tag: int, channel: int) -> bytes:
    """The three frames of a delivery of a Celery task message, as RabbitMQ sends them."""
    message = Message(f"id-{tag}", "tasks.add", [tag, "x" * (tag % 50)], {"k": tag})
    body, headers = CeleryCodec().encode(message, get_serializer("json"))
    properties = encode_properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=0,
        correlation_id=message.id,
        reply_to="amq.gen-reply",
    )
    deliver = spec.Basic.Deliver("ctag1.x", tag, tag % 2 == 0, "", "celery")
    return (
        pamqp.frame.marshal(deliver, channel)
        + raw_frame(2, channel, struct.pack(">HHQ", 60, 0, len(body)) + properties)
        + raw_frame(3, channel, body)
    )


def stream() -> bytes:
    """Deliveries, confirms, a heartbeat and a method with a table: what a busy connection brings."""
    parts = [pamqp.frame.marshal(Heartbeat(), 0)]
    for tag in range(1, 120):
        parts.append(task_delivery(tag, 1 + tag % 3))
        if tag % 7 == 0:
            parts.append(pamqp.frame.marshal(spec.Basic.Ack(tag, multiple=True), 2))
    table = encode_table({"a": 1, "b": [1, "two", None], "c": {"d": 2.5}})
    # queue.declare: reserved short, empty name, no flags, its arguments table
    parts.append(raw_frame(1, 5, struct.pack(">HH", 50, 10) + b"\x00" * 4 + table))
    return b"".join(parts)


def comparable(frame: Any) -> tuple[int, int, str, bytes]:
    """A frame as its type and bytes (marshalled again by pamqp)."""
    weight, channel, value = frame
    return weight, channel, type(value).__name__, pamqp.frame.marshal(value, channel)


async def read_all(data: bytes, get_frame: Any, chunks: random.Random | None) -> list[Any]:
    """Every frame in ``data``, fed to a stream reader in random chunks while ``get_frame`` reads."""
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True

    async def feed() -> None:
        pos = 0
        while pos < len(data):
            size = chunks.randint(1, 3000) if chunks else len(data)
            reader.feed_data(data[pos : pos + size])
            pos += size
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    frames = []
    try:
        while True:
            try:
                frames.append(await asyncio.wait_for(get_frame(receiver), 5))
            except StopAsyncIteration:
                break
    finally:
        await feeding
    return frames


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
async def test_get_frame_reads_the_same_frames_as_aiormq_whole_or_in_any_chunks(seed: int | None) -> None:
    # Given a stream of deliveries, confirms and other frames, arriving whole or in random chunks
    data = stream()
    chunks = None if seed is None else random.Random(seed)
    # When read by aqueue's get_frame and by aiormq's own
    ours = await read_all(data, amqp_reader.get_frame, chunks)
    chunks = None if seed is None else random.Random(seed)
    theirs = await read_all(data, amqp_reader._aiormq_get_frame, chunks)
    # Then both read the same frames, in the same order
    assert len(ours) == len(theirs) == 1 + 3 * 119 + 119 // 7 + 1
    assert [comparable(f) for f in ours] == [comparable(f) for f in theirs]


async def test_a_buffered_frame_with_a_bad_end_octet_is_refused_as_aiormq_refuses_it() -> None:
    # Given a whole frame in the buffer whose frame-end octet is wrong
    bad = raw_frame(1, 1, struct.pack(">HHQ", 60, 80, 5) + b"\x00", end=b"\x00")
    for get_frame in (amqp_reader.get_frame, amqp_reader._aiormq_get_frame):
        reader = asyncio.StreamReader()
        receiver = FrameReceiver(reader)
        receiver.started = True
        reader.feed_data(bad)
        # Then reading it raises aiormq's InvalidFrameError
        with pytest.raises(InvalidFrameError):
            await get_frame(receiver)


async def test_a_stream_cut_inside_a_frame_raises_aiormq_connection_error() -> None:
    # Given half a frame, then the end of the stream
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True
    reader.feed_data(task_delivery(1, 1)[:20])
    reader.feed_eof()
    # Then reading says the connection closed, as aiormq does
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await amqp_reader.get_frame(receiver)


async def test_frames_left_in_the_buffer_of_a_failed_connection_are_not_read() -> None:
    # Given whole frames buffered, then the connection reset
    reader = asyncio.StreamReader()
    receiver = FrameReceiver(reader)
    receiver.started = True
    reader.feed_data(task_delivery(1, 1))
    reader.set_exception(ConnectionResetError("reset by peer"))
    # Then reading fails at once, as aiormq's own reader does, instead of handing out the delivery
    with pytest.raises(AMQPConnectionError, match="reset"):
        await amqp_reader.get_frame(receiver)


def test_install_leaves_a_frame_receiver_someone_else_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given aiormq's get_frame replaced by another library
    async def other(self: FrameReceiver) -> Any:
        raise NotImplementedError

    monkeypatch.setattr(FrameReceiver, "get_frame", other)
    # Then install() does not replace it, and says so
    assert amqp_reader.install() is False
    assert FrameReceiver.get_frame is other


def test_install_is_in_effect_once_aqueue_amqp_is_imported() -> None:
    import aqueue.broker.amqp_consumer  # noqa: F401

    assert amqp_reader.install() is True
    assert FrameReceiver.get_frame is amqp_reader.get_frame


# On the real RabbitMQ --------------------------------------------------------------------------------


@pytest.fixture
async def channel(unique: str) -> AsyncIterator[tuple[aiormq.Channel, str]]:
    require_server("amqp")
    connection = await aiormq.connect(URL)
    try:
        channel = cast(aiormq.Channel, await connection.channel())
        queue = f"t-reader-{unique}"
        await channel.queue_declare(queue, auto_delete=True)
        yield channel, queue
        await channel.queue_delete(queue)
    finally:
        await connection.close()


async def publish(channel: aiormq.Channel, queue: str, bodies: list[bytes]) -> None:
    await asyncio.gather(*(channel.basic_publish(body, routing_key=queue) for body in bodies))


async def until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def recorder() -> tuple[list[tuple[bytes, int]], amqp_reader.OnMessage]:
    """A plain callback, and the list of each body it got with the id of the task it ran in."""
    received: list[tuple[bytes, int]] = []

    def on_message(message: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        received.append((message.body, id(task)))

    return received, on_message


def task_of(wrapped: Any) -> int:
    """The id of the asyncio task behind aiormq's ``TaskWrapper``."""
    return id(getattr(wrapped, "task", wrapped))


async def test_a_plain_callback_gets_every_delivery_from_the_channels_reader_without_a_task_each(
    channel: tuple[aiormq.Channel, str],
) -> None:
    raw, queue = channel
    # Given a consumer started by amqp_reader.consume with a plain function
    received, on_message = recorder()
    await amqp_reader.consume(raw, queue, on_message, no_ack=True)
    # When 200 messages arrive
    await publish(raw, queue, [b"m%d" % i for i in range(200)])
    await until(lambda: len(received) == 200)
    # Then each came in order, and all were handed over by the connection's reader or the channel's
    # (while the channel's reader handles the publisher confirms of this channel), where aiormq's own
    # consumers get a new task per delivery
    assert [body for body, _ in received] == [b"m%d" % i for i in range(200)]
    connection: Any = raw.connection
    readers = {task_of(connection._reader_task), task_of(cast(Any, raw)._Channel__reader_task)}
    assert {task for _, task in received} <= readers


async def test_deliveries_to_an_idle_channel_come_straight_from_the_connections_reader(
    channel: tuple[aiormq.Channel, str],
) -> None:
    raw, queue = channel
    # Given a plain callback on a channel of its own, which nothing else uses
    consuming = cast(aiormq.Channel, await raw.connection.channel(publisher_confirms=False))
    received, on_message = recorder()
    await amqp_reader.consume(consuming, queue, on_message, no_ack=True)
    # When 200 messages arrive, one of several frames
    body = bytes(range(256)) * 1000
    await publish(raw, queue, [b"m%d" % i for i in range(199)] + [body])
    await until(lambda: len(received) == 200)
    # Then every one was handed over as the connection's reader read it: no loop turn through the
    # channel's reader
    assert [b for b, _ in received] == [b"m%d" % i for i in range(199)] + [body]
    connection: Any = raw.connection
    assert {task for _, task in received} == {task_of(connection._reader_task)}
    await consuming.close()


async def test_confirms_are_settled_as_they_come_and_after_frames_queued_before_them(
    channel: tuple[aiormq.Channel, str],
) -> None:
    raw, queue = channel
    # Given a channel whose confirms an outbox waits for
    Outbox(raw)
    loop = asyncio.get_running_loop()
    # When RabbitMQ confirms publishes while the channel's reader is idle
    confirmed: list[Any] = []
    original = raw._on_confirm_frame

    async def counted(frame: Any) -> None:
        confirmed.append(frame)
        await original(frame)

    raw._on_confirm_frame = counted  # type: ignore[method-assign]
    await publish(raw, queue, [b"c%d" % i for i in range(50)])
    # Then none of them went through the channel's reader
    assert confirmed == []
    # And a confirm that comes while another frame waits in the queue waits for it
    waiting = raw.confirmations[10_000] = loop.create_future()
    raw.frames.put_nowait((0, spec.Basic.Qos()))  # a frame the channel's reader just passes on
    raw.frames.put_nowait((0, spec.Basic.Ack(10_000)))
    assert not waiting.done()
    await asyncio.wait_for(waiting, 5)
    assert [type(frame) for frame in confirmed] == [spec.Basic.Ack]
    raw.rpc_frames.get_nowait()  # the passed-on Qos, which no call waits for


async def test_a_callback_that_raises_is_logged_and_the_channel_goes_on(
    channel: tuple[aiormq.Channel, str], caplog: pytest.LogCaptureFixture
) -> None:
    raw, queue = channel
    # Given a callback that fails on the first message
    received: list[bytes] = []

    def on_message(message: Any) -> None:
        if message.body == b"bad":
            raise RuntimeError("callback broke")
        received.append(message.body)

    await amqp_reader.consume(raw, queue, on_message, no_ack=True)
    # When a message it fails on comes, then others
    with caplog.at_level(logging.ERROR, logger="aqueue.broker.amqp_reader"):
        await publish(raw, queue, [b"bad"])
        await until(lambda: "callback broke" in caplog.text)
        await publish(raw, queue, [b"one", b"two"])
        await until(lambda: len(received) == 2)
    # Then the failure was logged with its traceback, and the channel still delivers
    assert received == [b"one", b"two"]
    assert "Consumer callback failed" in caplog.text
    assert not raw.is_closed


async def test_a_body_bigger_than_a_frame_arrives_whole(channel: tuple[aiormq.Channel, str]) -> None:
    raw, queue = channel
    assert raw.connection.connection_tune.frame_max < 400_000
    # Given a body RabbitMQ sends in several frames
    body = bytes(random.Random(7).randrange(256) for _ in range(400_000))
    received: list[bytes] = []
    await amqp_reader.consume(raw, queue, lambda message: received.append(message.body), no_ack=True)
    # When it arrives, with an empty body after it
    await publish(raw, queue, [body, b""])
    await until(lambda: len(received) == 2)
    # Then the callback gets it whole, and the empty one empty
    assert received == [body, b""]


async def test_aiormqs_own_consumers_on_the_same_channel_still_get_theirs(
    channel: tuple[aiormq.Channel, str], unique: str
) -> None:
    raw, queue = channel
    other = f"t-reader-other-{unique}"
    await raw.queue_declare(other, auto_delete=True)
    try:
        # Given a plain callback on one queue and aiormq's own (async) consumer on another, one channel
        plain: list[bytes] = []
        theirs: list[bytes] = []

        async def their_callback(message: Any) -> None:
            theirs.append(message.body)

        await amqp_reader.consume(raw, queue, lambda message: plain.append(message.body), no_ack=True)
        await raw.basic_consume(other, their_callback, no_ack=True)
        # When messages come to both
        await publish(raw, queue, [b"p1", b"p2"])
        await publish(raw, other, [b"o1", b"o2"])
        await until(lambda: len(plain) == 2 and len(theirs) == 2)
        # Then each consumer got its own
        assert (plain, theirs) == ([b"p1", b"p2"], [b"o1", b"o2"])
    finally:
        await raw.queue_delete(other)
