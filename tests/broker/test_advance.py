"""Broker.advance: the marks beat keeps on the broker, shared by every process of one store."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest

from aqueue.broker import Broker
from aqueue.broker import from_url as broker_from_url
from aqueue.broker.amqp import AMQPBroker
from tests.conftest import AMQP_URL, Transport, require_server


@pytest.fixture
async def key(broker_transport: Transport) -> AsyncIterator[str]:
    """A mark key of this test; on RabbitMQ its value queues are deleted afterwards."""
    key = f"beat.{broker_transport.unique}"
    yield key
    if broker_transport.kind == "amqp":
        async with AMQPBroker(broker_transport.broker_url) as broker, broker._scratch() as channel:
            for name in (key, f"{key}-b"):
                await channel.queue_delete(f"aqueue.mark.{name}")


async def test_a_mark_is_set_then_only_raised(broker: Broker, key: str) -> None:
    # Given no mark: the first call sets it and says it was unset
    assert await broker.advance(key, 100.0) is None
    # When it is raised, the call returns the value it had
    assert await broker.advance(key, 101.5) == 100.0
    # Then a value at or below the mark leaves it alone and returns it
    assert await broker.advance(key, 101.5) == 101.5
    assert await broker.advance(key, 50.0) == 101.5
    assert await broker.advance(key, 102.0) == 101.5
    # And other keys are other marks
    assert await broker.advance(f"{key}-b", 1.0) is None


async def test_of_brokers_raising_one_mark_at_once_exactly_one_sees_it_below(
    broker: Broker, broker_transport: Transport, key: str
) -> None:
    # Given four more brokers on the same store, and a mark they all know
    others = [broker_from_url(broker_transport.broker_url, broker_transport.broker_options) for _ in range(4)]
    brokers = [broker, *others]
    try:
        await broker.advance(key, 10.0)
        for value in (11.0, 12.0, 13.0):
            # When all of them raise it to the same value at once
            seen = await asyncio.gather(*(b.advance(key, value) for b in brokers))
            # Then exactly one of them moved it there
            assert sum(1 for previous in seen if previous is not None and previous < value) == 1, seen
    finally:
        for other in others:
            await other.aclose()


async def test_on_rabbitmq_a_mark_moves_to_another_process_when_its_owner_goes(unique: str) -> None:
    require_server("amqp")
    key = f"beat.{unique}"
    async with AMQPBroker(AMQP_URL) as other:
        try:
            # Given a mark owned by one connection
            owner = AMQPBroker(AMQP_URL)
            assert await owner.advance(key, 5.0) is None
            # Then another connection is told it is taken, whatever the value
            assert await other.advance(key, 6.0) == math.inf
            # When the owner closes its connection
            await owner.aclose()
            # Then the other takes the mark over with its value, and raises it
            assert await other.advance(key, 6.0) == 5.0
            assert await other.advance(key, 6.0) == 6.0
        finally:
            async with other._scratch() as channel:
                await channel.queue_delete(f"aqueue.mark.{key}")
