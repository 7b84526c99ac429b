"""The AMQP outbox against the real RabbitMQ: acks coalesced, nacks first, confirms, closed channels."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any, cast

import aiormq
import pamqp.frame
import pytest
from aiormq.exceptions import ChannelInvalidStateError, PublishError
from pamqp import commands as spec
from pamqp.header import ContentHeader

from aqueue.broker import amqp_writer
from aqueue.broker.amqp import AMQPBroker
from aqueue.broker.amqp_consumer import AMQPConsumer
from aqueue.broker.amqp_wire import SUPPORTED_AIORMQ, Outbox, check_aiormq, encode_properties
from aqueue.exceptions import DeliveryLost, ImproperlyConfigured
from tests.broker.test_amqp import broker, envelopes, queue, ready_count, receive

__all__ = ["broker", "queue"]  # the fixtures of test_amqp, used here too


def frames_in(payload: bytes, channel: int | None = None) -> list[Any]:
    """The AMQP frames marshalled in ``payload`` (those on ``channel`` only, if given)."""
    frames, offset = [], 0
    while offset < len(payload):
        used, number, frame = pamqp.frame.unmarshal(payload[offset:])
        if channel is None or number == channel:
            frames.append(frame)
        offset += used
    return frames


def written(outbox: Outbox) -> list[list[Any]]:
    """The frames on ``outbox``'s channel of each write to the connection's socket from now on."""
    writes: list[list[Any]] = []
    stream = amqp_writer.stream(outbox.channel.connection)
    assert stream is not None
    write = stream.write  # aiormq's writer task writes what it takes from its queue through this too

    def recorded(data: Any) -> None:
        frames = frames_in(bytes(data), outbox.channel.number)
        if frames:
            writes.append(frames)
        write(data)

    stream.write = recorded  # type: ignore[method-assign]
    return writes


def consume(broker: AMQPBroker, queue: str, prefetch: int) -> AMQPConsumer:
    return cast(AMQPConsumer, broker.consume([queue], prefetch))


async def test_publish_writes_1000_envelopes_at_once_and_awaits_their_confirms(
    broker: AMQPBroker, queue: str
) -> None:
    # Given a broker whose publisher channel's writes are recorded
    await broker.publish(envelopes(queue, 1))
    writes = written(await broker._outbox())
    # When publishing 1,000 envelopes
    await broker.publish(envelopes(queue, 1000))
    # Then they went to RabbitMQ in one write (method, header and body frame each), and RabbitMQ holds
    # every one once publish returned
    assert [len(frames) for frames in writes] == [3000]
    assert await ready_count(broker, queue) == 1001


async def test_acks_of_one_turn_go_as_one_multiple_ack_and_singles(broker: AMQPBroker, queue: str) -> None:
    # Given ten deliveries held by one consumer
    await broker.publish(envelopes(queue, 10))
    async with consume(broker, queue, 10) as consumer:
        held = [await receive(consumer) for _ in range(10)]
        assert consumer._outbox is not None
        writes = written(consumer._outbox)
        # When all but the fourth are acknowledged in one loop turn
        for delivery in held[:3] + held[4:]:
            await delivery.ack()
        await consumer._outbox.flush()
        # Then one write carries a multiple ack up to the third, and single acks for the six after it
        assert len(writes) == 1
        assert [(f.delivery_tag, f.multiple) for f in writes[0]] == [(3, True)] + [
            (t, False) for t in range(5, 11)
        ]
        # And only the one still open is kept in the outbox's books
        assert list(consumer._outbox._unsettled) == [4]
        # And acknowledging the fourth then is a multiple ack of the fourth alone (the rest are settled)
        await held[3].ack()
        await consumer._outbox.flush()
        assert [(f.delivery_tag, f.multiple) for f in writes[1]] == [(4, True)]
    # And none of them came back to the queue when the consumer closed
    assert await ready_count(broker, queue) == 0


async def test_one_turns_acks_are_written_at_the_end_of_that_turn_without_a_task(
    broker: AMQPBroker, queue: str
) -> None:
    # Given a delivery held by a consumer, its outbox's socket writes recorded
    await broker.publish(envelopes(queue, 1))
    async with consume(broker, queue, 1) as consumer:
        held = await receive(consumer)
        assert consumer._outbox is not None
        writes = written(consumer._outbox)
        # When it is acknowledged and the loop goes round once
        await held.ack()
        assert writes == []
        await asyncio.sleep(0)
        # Then the ack is on the socket already, and no flush task was needed for it
        assert [[type(f).__name__ for f in frames] for frames in writes] == [["Ack"]]
        assert consumer._outbox._flushing is None
    assert await ready_count(broker, queue) == 0


async def test_nacks_are_written_before_a_multiple_ack_that_passes_them(
    broker: AMQPBroker, queue: str
) -> None:
    # Given three deliveries
    await broker.publish(envelopes(queue, 3))
    async with consume(broker, queue, 3) as consumer:
        first, second, third = [await receive(consumer) for _ in range(3)]
        # When the second is rejected and the others acknowledged in the same turn
        await first.ack()
        await second.reject()
        await third.ack()
        assert consumer._outbox is not None
        await consumer._outbox.flush()
    # Then the second is in the dead-letter queue, not acknowledged by the multiple ack, and nothing is left
    assert [e.id for e in await broker.dead_letters(queue)] == [second.id]
    assert await ready_count(broker, queue) == 0


async def test_requeued_delivery_comes_back(broker: AMQPBroker, queue: str) -> None:
    await broker.publish(envelopes(queue, 2))
    async with consume(broker, queue, 1) as consumer:
        delivery = await receive(consumer)
        await delivery.requeue()
        again = []
        for _ in range(2):
            again.append(await receive(consumer))
            await again[-1].ack()
    assert sorted(d.id for d in again) == ["m0", "m1"]
    assert await ready_count(broker, queue) == 0


async def test_unroutable_mandatory_publish_fails_its_future_only(broker: AMQPBroker, queue: str) -> None:
    # Given the broker's outbox, after a publish declared the queue
    await broker.publish(envelopes(queue, 1))
    outbox = await broker._outbox()
    # When one mandatory message goes to a queue that does not exist and one to the real queue
    lost = outbox.publish("", f"{queue}-missing", encode_properties(message_id="lost"), b"x", True, "lost")
    kept = outbox.publish(queue, queue, encode_properties(message_id="kept"), b"y", True, "kept")
    assert lost is not None and kept is not None
    # Then the first fails as returned, the second is confirmed
    with pytest.raises(PublishError):
        await asyncio.wait_for(lost, 5)
    await asyncio.wait_for(kept, 5)
    assert await ready_count(broker, queue) == 2


async def test_publishes_waiting_for_confirms_fail_when_the_channel_closes(broker: AMQPBroker) -> None:
    # Given an outbox on a channel of its own, with confirms on
    channel = await broker.channel(confirms=True)
    raw = await channel.get_underlay_channel()
    assert isinstance(raw, aiormq.Channel)
    outbox = Outbox(raw)
    # When a publish goes to an exchange that does not exist, so RabbitMQ closes the channel unconfirmed
    confirmed = outbox.publish("aqueue.test.no-such-exchange", "x", encode_properties(), b"x")
    # Then its future fails with ChannelInvalidStateError, and the outbox refuses more work
    assert confirmed is not None
    with pytest.raises(ChannelInvalidStateError):
        await asyncio.wait_for(confirmed, 5)
    assert outbox.closed
    with pytest.raises(ChannelInvalidStateError):
        outbox.ack(1)
    await channel.close()


async def test_after_its_channel_closes_the_consumer_hands_out_fresh_copies_only(
    broker: AMQPBroker, queue: str
) -> None:
    # Given a consumer that handed out one of two messages and holds the other, fetched
    await broker.publish(envelopes(queue, 2))
    async with consume(broker, queue, 2) as consumer:
        first = await receive(consumer)
        deadline = asyncio.get_running_loop().time() + 5
        while not (consumer._inbox or consumer._buffer):
            assert asyncio.get_running_loop().time() < deadline, "the second message never arrived"
            await asyncio.sleep(0.01)
        # When their channel closes (the robust channel opens a new one and consumes again)
        assert consumer._outbox is not None
        await consumer._outbox.channel.close()
        # Then acknowledging the handed-out one raises DeliveryLost
        with pytest.raises(DeliveryLost):
            await first.ack()
        # And what comes next are RabbitMQ's new copies of both, never the stale fetched one
        again = []
        for _ in range(2):
            again.append(await receive(consumer, timeout=10))
            await again[-1].ack()
    assert sorted(d.id for d in again) == ["m0", "m1"]
    assert all(d.redelivered for d in again)
    assert await ready_count(broker, queue) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"content_type": "application/json", "delivery_mode": 2, "message_id": "3f2a0c4e-1b7d"},
        {
            "content_type": "application/json",
            "delivery_mode": 1,
            "correlation_id": "c1",
            "expiration": "60000",
        },
        {"content_type": "application/x-msgpack", "content_encoding": "binary", "priority": 9},
        {"reply_to": "aqueue.reply.ab", "message_type": "aqueue.rpc.batch", "delivery_mode": 1},
    ],
)
def test_encoded_properties_are_what_pamqp_marshals(fields: dict[str, Any]) -> None:
    header = ContentHeader(0, 5, spec.Basic.Properties(**fields))
    assert encode_properties(**fields) == header.marshal()[12:]  # after class id, weight and body size


async def test_published_frames_are_what_pamqp_marshals(broker: AMQPBroker, queue: str) -> None:
    # Given the broker's outbox, recording its writes
    await broker.publish(envelopes(queue, 1))
    outbox = await broker._outbox()
    writes = written(outbox)
    # When a message with a body longer than one frame is published
    step = outbox.channel.max_content_size
    body = (bytes(range(256)) * (3 * step // 256))[: 2 * step + 100]
    fields: dict[str, Any] = {
        "content_type": "application/octet-stream",
        "message_id": "big",
        "delivery_mode": 2,
    }
    confirmed = outbox.publish(queue, queue, encode_properties(**fields), body, True, "big")
    assert confirmed is not None
    await asyncio.wait_for(confirmed, 5)
    # Then its frames are pamqp's: the method, the content header and the body split by the frame size
    frames = writes[0]
    assert isinstance(frames[0], spec.Basic.Publish)
    assert (frames[0].exchange, frames[0].routing_key, frames[0].mandatory) == (queue, queue, True)
    assert isinstance(frames[1], ContentHeader) and frames[1].body_size == len(body)
    assert (frames[1].properties.message_id, frames[1].properties.delivery_mode) == ("big", 2)
    assert [len(f.value) for f in frames[2:]] == [step, step, 100]
    assert b"".join(f.value for f in frames[2:]) == body
    assert await ready_count(broker, queue) == 2


async def test_write_now_writes_a_gathered_batch_in_the_same_loop_turn(
    broker: AMQPBroker, queue: str
) -> None:
    # Given the broker's outbox, recording its writes
    await broker.publish(envelopes(queue, 1))
    outbox = await broker._outbox()
    writes = written(outbox)
    # When two publishes are queued and write_now() is called, without yielding to the loop
    confirms = [outbox.publish(queue, queue, encode_properties(message_id=f"n{i}"), b"x") for i in range(2)]
    outbox.write_now()
    # Then both went out in one write already, and both are confirmed in order
    assert [len(frames) for frames in writes] == [6]
    for confirmed in confirms:
        assert confirmed is not None
        await asyncio.wait_for(confirmed, 5)
    # And the flush task that the publishes scheduled finds nothing left to write
    await outbox.flush()
    assert len(writes) == 1
    assert await ready_count(broker, queue) == 3


def test_the_installed_aiormq_has_the_channel_internals_the_outbox_uses() -> None:
    # Given the aiormq this runs with; When it is checked; Then nothing is missing
    check_aiormq()


def test_an_aiormq_channel_without_them_is_refused_naming_the_supported_releases() -> None:
    # Given a Channel class that keeps its delivery tags and confirmations elsewhere
    class Channel:
        lock = closing = is_closed = None

        def __init__(self) -> None:
            self.number = self.write_queue = self.publisher_confirms = self.max_content_size = 0
            self.tags = self.pending = self.ids = 0

    # When it is checked as aiormq 7.9.0's; Then the error names what is missing and what to install
    with pytest.raises(ImproperlyConfigured) as raised:
        check_aiormq(Channel, aiormq.abc.ChannelFrame, version="7.9.0")
    message = str(raised.value)
    assert "aiormq 7.9.0 is installed" in message
    assert "Channel.delivery_tag, Channel.confirmations, Channel.message_id_delivery_tag" in message
    assert f"pip install 'aiormq{SUPPORTED_AIORMQ}'" in message


def test_the_pin_in_pyproject_is_the_supported_releases() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert f"aiormq{SUPPORTED_AIORMQ}" in pyproject["project"]["optional-dependencies"]["amqp"]
