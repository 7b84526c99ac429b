"""The contract every broker keeps, run on each transport (memory, sqlite, redis, amqp)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import pytest

from aqueue.broker import Broker, Consumer, Delivery
from aqueue.message import Envelope

if TYPE_CHECKING:
    from tests.conftest import Transport

JSON = "application/json"


def envelope(queue: str, body: bytes = b'{"n": 1}', eta: float | None = None) -> Envelope:
    return Envelope(uuid.uuid4().hex, queue, body, JSON, eta=eta)


async def receive(consumer: Consumer, timeout: float = 5.0) -> Delivery:
    with anyio.fail_after(timeout):
        return await consumer.receive()


async def assert_nothing(consumer: Consumer, wait: float = 0.5) -> None:
    with anyio.move_on_after(wait):
        delivery = await consumer.receive()
        pytest.fail(f"unexpected {delivery!r}")


async def first_message(channel: AsyncIterator[bytes], timeout: float = 5.0) -> bytes:
    with anyio.fail_after(timeout):
        return await anext(channel)


async def test_publish_then_consume_delivers_the_same_message(
    broker: Broker, broker_transport: Transport
) -> None:
    # Given a message published to a queue
    sent = envelope(broker_transport.queue, b'{"args": [4, 4]}')
    await broker.publish([sent])
    # When a consumer of that queue receives
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        delivery = await receive(consumer)
        await delivery.ack()
    # Then it gets that message, not marked as redelivered
    assert (delivery.id, delivery.queue, delivery.body, delivery.content_type) == (
        sent.id,
        sent.queue,
        sent.body,
        JSON,
    )
    assert not delivery.redelivered


async def test_prefetch_bounds_unsettled_deliveries(broker: Broker, broker_transport: Transport) -> None:
    # Given three messages and a consumer with a prefetch window of two
    await broker.publish([envelope(broker_transport.queue) for _ in range(3)])
    async with broker.consume([broker_transport.queue], prefetch=2) as consumer:
        first, second = await receive(consumer), await receive(consumer)
        # When two are unsettled, then the third is not handed out
        assert len(consumer.held) == 2
        await assert_nothing(consumer, 0.3)
        # When one is settled, then there is room for the third
        await first.ack()
        third = await receive(consumer)
        assert len({first.id, second.id, third.id}) == 3
        assert len(consumer.held) <= 2
        await second.ack()
        await third.ack()


async def test_ack_removes_the_message_for_good(broker: Broker, broker_transport: Transport) -> None:
    # Given a message received and acknowledged
    await broker.publish([envelope(broker_transport.queue)])
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        await (await receive(consumer)).ack()
    # When another consumer looks for it, then it is gone
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        await assert_nothing(consumer)
    assert await broker.purge(broker_transport.queue) == 0


async def test_requeue_makes_the_message_available_again(broker: Broker, broker_transport: Transport) -> None:
    # Given a message received once
    sent = envelope(broker_transport.queue)
    await broker.publish([sent])
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        first = await receive(consumer)
        # When it is requeued
        await first.requeue()
        # Then it is delivered again, flagged as redelivered
        again = await receive(consumer)
        assert (again.id, again.body, again.redelivered) == (sent.id, sent.body, True)
        await again.ack()


async def test_rejected_message_does_not_come_back(broker: Broker, broker_transport: Transport) -> None:
    # Given a message received and rejected
    sent = envelope(broker_transport.queue)
    await broker.publish([sent])
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        await (await receive(consumer)).reject()
        # When the consumer keeps consuming, then it never gets it again
        await assert_nothing(consumer)
    # And it is listed, unchanged, among the queue's dead letters
    with anyio.fail_after(5):
        while not (dead := await broker.dead_letters(broker_transport.queue)):
            await anyio.sleep(0.05)
    assert [(e.id, e.body, e.content_type) for e in dead] == [(sent.id, sent.body, sent.content_type)]


async def test_eta_is_not_delivered_early(broker: Broker, broker_transport: Transport) -> None:
    # Given a message whose eta is one second away
    eta = time.time() + 1.0
    sent = envelope(broker_transport.queue, eta=eta)
    await broker.publish([sent])
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        # When a consumer waits, then nothing comes before the eta
        await assert_nothing(consumer, 0.5)
        # And the message comes after it
        delivery = await receive(consumer)
        assert delivery.id == sent.id
        assert time.time() >= eta - 0.05
        await delivery.ack()


async def test_consumer_of_several_queues_gets_from_each(broker: Broker, broker_transport: Transport) -> None:
    # Given one message in each of two queues
    queues = [broker_transport.queue, f"{broker_transport.queue}-b"]
    sent = [envelope(queue) for queue in queues]
    try:
        await broker.publish(sent)
        # When one consumer consumes both queues
        async with broker.consume(queues, prefetch=2) as consumer:
            got = [await receive(consumer), await receive(consumer)]
            for delivery in got:
                await delivery.ack()
        # Then it gets both, each from its own queue
        assert {(d.id, d.queue) for d in got} == {(e.id, e.queue) for e in sent}
    finally:
        await broker.purge(queues[1])


async def test_purge_deletes_waiting_messages_and_counts_them(
    broker: Broker, broker_transport: Transport
) -> None:
    # Given three waiting messages
    await broker.publish([envelope(broker_transport.queue) for _ in range(3)])
    # When the queue is purged
    deleted = await broker.purge(broker_transport.queue)
    # Then all three are counted and none is delivered
    assert deleted == 3
    async with broker.consume([broker_transport.queue], prefetch=1) as consumer:
        await assert_nothing(consumer)


async def test_broadcast_reaches_every_subscriber(broker: Broker, broker_transport: Transport) -> None:
    # Given two subscribers of one channel
    channel = f"control-{broker_transport.unique}"
    async with broker.subscribe(channel) as first, broker.subscribe(channel) as second:
        # When something is broadcast on it
        await broker.broadcast(channel, b"ping")
        # Then each subscriber receives it
        assert await first_message(first) == b"ping"
        assert await first_message(second) == b"ping"


async def test_aclose_requeues_deliveries_never_handed_out(
    broker: Broker, broker_transport: Transport
) -> None:
    # Given a consumer that may have fetched three messages but handed out only one
    sent = [envelope(broker_transport.queue) for _ in range(3)]
    await broker.publish(sent)
    consumer = broker.consume([broker_transport.queue], prefetch=3)
    handed_out = await receive(consumer)
    await handed_out.ack()
    # When it is closed
    await consumer.aclose()
    # Then another consumer gets the other two
    async with broker.consume([broker_transport.queue], prefetch=3) as other:
        rest = [await receive(other), await receive(other)]
        for delivery in rest:
            await delivery.ack()
    assert {d.id for d in rest} == {e.id for e in sent} - {handed_out.id}
