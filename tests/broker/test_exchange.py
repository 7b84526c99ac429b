"""Celery's exchanges on every broker: fanout, topic and direct routing, what a message carries, clean-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import anyio
import pytest

from aqueue.broker import Broker
from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener, topic_matches

MakeExchange = Callable[..., Exchange]


@pytest.fixture
async def exchange(broker: Broker, unique: str) -> AsyncIterator[MakeExchange]:
    """Exchanges named for this test; deleted from RabbitMQ afterwards."""
    made: list[Exchange] = []

    def make(kind: str, name: str = "ex") -> Exchange:
        made.append(Exchange(f"{name}-{unique}", kind, durable=kind == "topic"))  # type: ignore[arg-type]
        return made[-1]

    yield make
    if type(broker).__name__ == "AMQPBroker":
        async with broker._scratch() as channel:  # type: ignore[attr-defined]
            for item in made:
                await channel.exchange_delete(item.name)


async def first(inbox: AsyncIterator[ExchangeMessage], timeout: float = 5.0) -> ExchangeMessage:
    with anyio.fail_after(timeout):
        return await anext(inbox)


async def nothing_in(inbox: AsyncIterator[ExchangeMessage], seconds: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(anext(inbox), seconds)
    except TimeoutError:
        return True
    return False


async def test_fanout_reaches_every_listener_with_body_headers_and_key(
    broker: Broker, exchange: MakeExchange, unique: str
) -> None:
    fanout = exchange("fanout")
    async with AsyncExitStack() as stack:
        # Given two listeners of one fanout exchange
        one = await stack.enter_async_context(broker.bind_exchange(fanout, Listener(f"a-{unique}")))
        two = await stack.enter_async_context(broker.bind_exchange(fanout, Listener(f"b-{unique}")))
        # When a message is sent
        sent = ExchangeMessage(
            b'{"method": "ping"}', {"clock": 3, "expires": 1796123658.8707879}, "", delivery_mode=2
        )
        await broker.send_to_exchange(fanout, sent)
        # Then both receive it as sent (a float header keeps its precision)
        for inbox in (one, two):
            got = await first(inbox)
            assert (got.body, got.headers, got.content_type) == (sent.body, sent.headers, "application/json")


async def test_topic_routes_by_pattern(broker: Broker, exchange: MakeExchange, unique: str) -> None:
    topic = exchange("topic")
    async with AsyncExitStack() as stack:
        every = await stack.enter_async_context(broker.bind_exchange(topic, Listener(f"a-{unique}", "#")))
        workers = await stack.enter_async_context(
            broker.bind_exchange(topic, Listener(f"b-{unique}", "worker.#"))
        )
        await broker.send_to_exchange(topic, ExchangeMessage(b"[1]", {"hostname": "w"}, "task.multi"))
        await broker.send_to_exchange(topic, ExchangeMessage(b"[2]", {"hostname": "w"}, "worker.heartbeat"))
        # Then '#' gets both, 'worker.#' only the worker event, each with its routing key
        assert [(m.body, m.routing_key) for m in [await first(every), await first(every)]] == [
            (b"[1]", "task.multi"),
            (b"[2]", "worker.heartbeat"),
        ]
        got = await first(workers)
        assert (got.body, got.routing_key) == (b"[2]", "worker.heartbeat")
        assert await nothing_in(workers)


async def test_direct_routes_to_the_matching_key_only(
    broker: Broker, exchange: MakeExchange, unique: str
) -> None:
    direct = exchange("direct")
    async with AsyncExitStack() as stack:
        mine = await stack.enter_async_context(
            broker.bind_exchange(direct, Listener(f"me-{unique}", f"me-{unique}"))
        )
        other = await stack.enter_async_context(
            broker.bind_exchange(direct, Listener(f"you-{unique}", f"you-{unique}"))
        )
        await broker.send_to_exchange(direct, ExchangeMessage(b"{}", {"ticket": "t1"}, f"me-{unique}"))
        got = await first(mine)
        assert (got.headers, got.routing_key) == ({"ticket": "t1"}, f"me-{unique}")
        assert await nothing_in(other)


async def test_a_message_nobody_listens_for_is_dropped(
    broker: Broker, exchange: MakeExchange, unique: str
) -> None:
    direct = exchange("direct")
    # Sending to a key nobody is bound to neither fails nor stays around for a later listener
    await broker.send_to_exchange(direct, ExchangeMessage(b"{}", {}, f"gone-{unique}"))
    async with broker.bind_exchange(direct, Listener(f"late-{unique}", f"late-{unique}")) as inbox:
        assert await nothing_in(inbox)


async def test_leaving_stops_delivery(broker: Broker, exchange: MakeExchange, unique: str) -> None:
    direct = exchange("direct")
    listener = Listener(f"q-{unique}", f"k-{unique}", message_ttl=300, expires=10)
    async with broker.bind_exchange(direct, listener) as inbox:
        await broker.send_to_exchange(direct, ExchangeMessage(b"1", {}, listener.binding_key))
        assert (await first(inbox)).body == b"1"
    # After the listener left, a new one with the same key gets only what is sent from now on
    await broker.send_to_exchange(direct, ExchangeMessage(b"2", {}, listener.binding_key))
    async with broker.bind_exchange(direct, listener) as inbox:
        await broker.send_to_exchange(direct, ExchangeMessage(b"3", {}, listener.binding_key))
        assert (await first(inbox)).body == b"3"


def test_topic_patterns() -> None:
    assert topic_matches("#", "task.multi") and topic_matches("#", "worker")
    assert topic_matches("worker.#", "worker.online") and not topic_matches("worker.#", "task.sent")
    assert topic_matches("task.*", "task.sent") and not topic_matches("task.*", "task.a.b")
    assert topic_matches("task.succeeded", "task.succeeded") and not topic_matches(
        "task.succeeded", "task.failed"
    )
