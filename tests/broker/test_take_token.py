"""Broker.take_token: the bucket behind global_rate_limit, shared by every broker on one store."""

from __future__ import annotations

import pytest

from aqueue.broker import Broker
from aqueue.broker import from_url as broker_from_url
from aqueue.rates import Rate
from tests.conftest import Transport


async def test_buckets_are_shared_by_brokers_on_one_store(
    broker: Broker, broker_transport: Transport
) -> None:
    rate = Rate(10, 1.0)
    key = f"bucket-{broker_transport.unique}"
    if broker_transport.kind == "amqp":
        # RabbitMQ keeps no store the workers share: global_rate_limit is refused there
        with pytest.raises(NotImplementedError):
            await broker.take_token(key, rate)
        return
    # Given a second broker on the same store
    async with broker_from_url(broker_transport.broker_url, broker_transport.broker_options) as other:
        # When the first takes the only token; Then the other must wait about a tenth of a second
        assert await broker.take_token(key, rate) == 0.0
        wait = await other.take_token(key, rate)
        assert 0.05 < wait <= 0.1
        # And a bucket of another key is full
        assert await other.take_token(f"{key}-b", rate) == 0.0
