"""RedisBroker against the real Redis on 127.0.0.1:6379: what the contract suite does not cover."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqueue.broker import from_url
from aqueue.broker.base import Consumer, Delivery
from aqueue.broker.redis import GROUP, RedisBroker
from aqueue.exceptions import ImproperlyConfigured, InvalidURL, OperationalError
from aqueue.message import Envelope
from tests.stubborn import stubborn_task

URL = "redis://127.0.0.1:6379/0"
JSON = "application/json"
Factory = Callable[..., Awaitable[RedisBroker]]


@pytest.fixture
async def make_broker(prefix: str, raw: aioredis.Redis) -> AsyncIterator[Factory]:
    """Connected brokers sharing the test's key prefix, closed after the test."""
    opened: list[RedisBroker] = []

    async def make(**options: Any) -> RedisBroker:
        broker = RedisBroker(URL, global_keyprefix=prefix, **options)
        await broker.connect()
        opened.append(broker)
        return broker

    yield make
    for broker in opened:
        await broker.aclose()


@pytest.fixture
async def broker(make_broker: Factory) -> RedisBroker:
    return await make_broker()


def envelopes(n: int, queue: str = "q", eta: float | None = None) -> list[Envelope]:
    return [Envelope(f"m{i}", queue, f"body {i}".encode(), JSON, eta) for i in range(n)]


async def receive(consumer: Consumer, timeout: float = 5.0) -> Delivery:
    return await asyncio.wait_for(consumer.receive(), timeout)


async def nothing_for(consumer: Consumer, seconds: float) -> None:
    with pytest.raises(asyncio.TimeoutError):
        delivery = await asyncio.wait_for(consumer.receive(), seconds)
        pytest.fail(f"unexpected {delivery!r}")


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def kill_client(raw: aioredis.Redis, name: str) -> int:
    """CLIENT KILL every connection called ``name``; returns how many."""
    clients = await raw.client_list()
    for client in clients:
        if client["name"] == name:
            await raw.client_kill_filter(_id=client["id"])
    return sum(client["name"] == name for client in clients)


# -- URLs and options ---------------------------------------------------------------------------


def test_unknown_option_names_the_closest_known_one() -> None:
    # Given a misspelt transport option
    # When the broker is built, then the error suggests the right name
    with pytest.raises(ImproperlyConfigured, match="'visibility_timeout'"):
        RedisBroker(URL, visibilty_timeout=10)


@pytest.mark.parametrize(
    "options", [{"visibility_timeout": 0}, {"max_deliveries": -1}, {"max_connections": 0}]
)
def test_non_positive_numbers_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ImproperlyConfigured, match=next(iter(options))):
        RedisBroker(URL, **options)


def test_celery_transport_options_are_accepted_and_urls_are_checked() -> None:
    # Given options copied from a Celery config, then they are accepted
    RedisBroker(URL, fanout_prefix=True, fanout_patterns=True, socket_timeout=3)
    # And a URL of another scheme, or a bad database, is refused
    with pytest.raises(InvalidURL):
        RedisBroker("amqp://127.0.0.1")
    with pytest.raises(InvalidURL):
        RedisBroker("redis://127.0.0.1/notanumber")


def test_from_url_passes_transport_options_and_repr_masks_the_password() -> None:
    broker = from_url("rediss://:s3cret@127.0.0.1:6380/2", {"visibility_timeout": 5})
    assert isinstance(broker, RedisBroker)
    assert broker.visibility_timeout == 5.0
    assert "s3cret" not in repr(broker)


async def test_unreachable_server_raises_operational_error() -> None:
    # Given a broker pointing at a loopback port nothing listens on
    broker = RedisBroker("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        # When it publishes, then the redis error comes out as OperationalError, in bounded time
        with pytest.raises(OperationalError, match="publish"):
            await asyncio.wait_for(broker.publish(envelopes(1)), 10)
    finally:
        await broker.aclose()


# -- Streams, groups and acks -------------------------------------------------------------------


async def test_publish_pipelines_a_thousand_envelopes_and_acks_empty_the_stream(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given 1,000 envelopes published in one call
    sent = envelopes(1000)
    started = time.monotonic()
    await broker.publish(sent)
    elapsed = time.monotonic() - started
    stream = broker.stream_key("q")
    assert await raw.xlen(stream) == 1000
    assert elapsed < 2.0
    # When they are all received and acknowledged
    got: list[Delivery] = []
    async with broker.consume(["q"], prefetch=200) as consumer:
        while len(got) < 1000:
            delivery = await receive(consumer)
            got.append(delivery)
            await delivery.ack()
    # Then they came in order, and the stream holds nothing, pending or not
    assert [d.id for d in got] == [e.id for e in sent]
    assert await raw.xlen(stream) == 0
    assert (await raw.xpending(stream, GROUP))["pending"] == 0


async def test_acks_of_one_loop_turn_share_one_round_trip(broker: RedisBroker, raw: aioredis.Redis) -> None:
    # Given 50 deliveries held by one consumer
    await broker.publish(envelopes(50))
    async with broker.consume(["q"], prefetch=50) as consumer:
        held = [await receive(consumer) for _ in range(50)]
        round_trips: list[int] = []
        real_send = broker._line.send

        async def counting_send(packed: bytes, count: int) -> list[Any]:
            round_trips.append(count)
            return await real_send(packed, count)

        broker._line.send = counting_send  # type: ignore[method-assign]
        # When they are all acknowledged at once
        await asyncio.gather(*(d.ack() for d in held))
        broker._line.send = real_send  # type: ignore[method-assign]
    # Then one round trip of one XACK and one XDEL carried every ack
    assert round_trips == [2]
    assert await raw.xlen(broker.stream_key("q")) == 0


async def test_the_ack_of_a_delivery_just_handed_out_goes_with_the_next_read(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given a consumer that hands out a delivery and goes straight back to reading, as a worker does
    first_sent, second_sent = envelopes(2)
    await broker.publish([first_sent])
    line_sends: list[int] = []
    real_send = broker._line.send

    async def counting_send(packed: bytes, count: int) -> list[Any]:
        line_sends.append(count)
        return await real_send(packed, count)

    async with broker.consume(["q"], prefetch=10) as consumer:
        first = await receive(consumer)
        acked: list[asyncio.Future[None]] = []

        async def hand_out_and_read_on() -> Delivery:
            # When its run, which starts in the next loop turn, acknowledges it while the consumer reads on
            acked.append(asyncio.ensure_future(first.ack()))
            return await consumer.receive()

        broker._line.send = counting_send  # type: ignore[method-assign]
        reading = asyncio.ensure_future(hand_out_and_read_on())
        await asyncio.sleep(0.1)
        await asyncio.wait_for(acked[0], 5)
        broker._line.send = real_send  # type: ignore[method-assign]
        # Then the ack went in the consumer's own write, not on the broker's line, and took effect
        assert line_sends == []
        assert await raw.xlen(broker.stream_key("q")) == 0
        await broker.publish([second_sent])
        assert (await asyncio.wait_for(reading, 5)).id == "m1"


async def test_concurrent_publishes_share_the_line_and_each_gets_its_own_error(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given a queue whose key holds a string, so that XADD to it fails
    await raw.set(broker.stream_key("bad"), "not a stream")
    # When 20 publishes run at once, one of them to that queue
    calls = [broker.publish(envelopes(5, queue=f"q{i}")) for i in range(19)]
    calls.insert(7, broker.publish(envelopes(1, queue="bad")))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    # Then only that one fails, with Redis's error, and every other envelope is stored
    assert [i for i, o in enumerate(outcomes) if o is not None] == [7]
    assert isinstance(outcomes[7], OperationalError) and "WRONGTYPE" in str(outcomes[7].__cause__)
    assert [await raw.xlen(broker.stream_key(f"q{i}")) for i in range(19)] == [5] * 19


async def test_two_brokers_never_deliver_the_same_entry_twice(make_broker: Factory) -> None:
    # Given 600 messages and two brokers consuming the queue at once
    first, second = await make_broker(), await make_broker()
    sent = envelopes(600)
    await first.publish(sent)
    seen: list[tuple[int, str]] = []

    async def consume(n: int, broker: RedisBroker) -> None:
        async with broker.consume(["q"], prefetch=25) as consumer:
            while len(seen) < len(sent):
                try:
                    delivery = await asyncio.wait_for(consumer.receive(), 0.5)
                except TimeoutError:
                    continue
                seen.append((n, delivery.id))
                await asyncio.sleep(0)
                await delivery.ack()

    # When both consume until everything is seen
    await asyncio.wait_for(asyncio.gather(consume(1, first), consume(2, second)), 20)
    # Then each message came exactly once, and both brokers took part
    ids = [message_id for _, message_id in seen]
    assert sorted(ids) == sorted(e.id for e in sent)
    assert {n for n, _ in seen} == {1, 2}


async def test_a_resent_envelope_comes_as_a_redelivery_and_a_resent_delayed_one_is_kept_once(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given an envelope sent again by a publish retry, and a delayed one sent twice, the second time marked
    await broker.publish([Envelope("m0", "q", b"x", JSON), Envelope("m1", "q", b"y", JSON, resent=True)])
    delayed = Envelope("d0", "q", b"z", JSON, time.time() + 60)
    await broker.publish([delayed])
    await broker.publish([Envelope("d0", "q", b"z", JSON, delayed.eta, resent=True)])
    # Then the resent one is delivered as a redelivery (the worker checks it did not run already)
    async with broker.consume(["q"], prefetch=2) as consumer:
        got = [await receive(consumer), await receive(consumer)]
        assert [(d.id, d.redelivered) for d in got] == [("m0", False), ("m1", True)]
        for delivery in got:
            await delivery.ack()
    # And the delayed one is waiting once: the same member of the sorted set
    assert await raw.zcard(broker.delayed_key("q")) == 1


async def test_requeue_adds_a_marked_entry_and_reject_dead_letters(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given two messages received
    await broker.publish(envelopes(2))
    async with broker.consume(["q"], prefetch=2) as consumer:
        first, second = await receive(consumer), await receive(consumer)
        # When one is requeued and the other rejected
        await first.requeue()
        await second.reject()
        # Then the stream holds one new entry marked redelivered
        entries = await raw.xrange(broker.stream_key("q"))
        assert entries is not None and len(entries) == 1
        fields = entries[0][1]
        assert fields is not None
        assert (fields[b"id"], fields[b"redelivered"]) == (b"m0", b"1")
        again = await receive(consumer)
        assert (again.id, again.redelivered) == ("m0", True)
        await again.ack()
    # And the rejected one is in the dead-letter stream, intact
    [dead] = await broker.dead_letters("q")
    assert (dead.id, dead.body, dead.content_type) == ("m1", b"body 1", JSON)
    assert await raw.xlen(broker.stream_key("q")) == 0


async def test_closing_a_consumer_that_holds_nothing_leaves_the_group(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    await broker.publish(envelopes(1))
    async with broker.consume(["q"], prefetch=1) as consumer:
        await (await receive(consumer)).ack()
        assert len(await raw.xinfo_consumers(broker.stream_key("q"), GROUP)) == 1
    assert await raw.xinfo_consumers(broker.stream_key("q"), GROUP) == []


async def test_a_stream_deleted_under_a_blocked_read_gets_its_group_back(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given a consumer blocked reading a stream that is then deleted (as FLUSHDB would)
    async with broker.consume(["q"], prefetch=1) as consumer:
        await nothing_for(consumer, 0.2)
        waiting = asyncio.ensure_future(consumer.receive())
        await asyncio.sleep(0.1)
        await raw.delete(broker.stream_key("q"))
        # When a message is published again, then the consumer still gets it
        await asyncio.sleep(0.1)
        await broker.publish(envelopes(1))
        delivery = await asyncio.wait_for(waiting, 5)
        assert delivery.id == "m0"
        await delivery.ack()
        # And closing after the stream is gone again is no error
        await raw.delete(broker.stream_key("q"))


async def test_cancelling_a_receive_always_cancels_it(broker: RedisBroker) -> None:
    # Given a consumer waiting on an empty queue
    async with broker.consume(["q"], prefetch=1) as consumer:
        for turns in range(40):
            waiting = asyncio.ensure_future(consumer.receive())
            for _ in range(turns):
                await asyncio.sleep(0)
            # When the waiting task is cancelled, at whatever point of a round trip it is
            waiting.cancel()
            done, _ = await asyncio.wait([waiting], timeout=3)
            # Then it ends cancelled at once (not swallowed, not after another blocking read)
            assert waiting in done and waiting.cancelled(), f"cancel swallowed after {turns} turns"


# -- Visibility timeout, renewal and dead letters -----------------------------------------------


async def test_abandoned_delivery_is_reclaimed_after_the_visibility_timeout(make_broker: Factory) -> None:
    # Given a worker that received a message and died without settling it (its broker closed)
    crashed = await make_broker(visibility_timeout=0.5)
    await crashed.publish(envelopes(1))
    consumer = crashed.consume(["q"], prefetch=1)
    assert (await receive(consumer)).id == "m0"
    await crashed.aclose()
    # When another worker consumes the queue
    survivor = await make_broker(visibility_timeout=0.5)
    async with survivor.consume(["q"], prefetch=1) as other:
        started = time.monotonic()
        delivery = await receive(other, 5)
        # Then it gets the message once the timeout has passed, flagged as redelivered
        assert (delivery.id, delivery.redelivered) == ("m0", True)
        assert time.monotonic() - started < 3
        await delivery.ack()


@pytest.mark.slow
async def test_live_consumer_renews_its_claim_past_the_visibility_timeout(make_broker: Factory) -> None:
    # Given a consumer running a long task, with a 0.5 s visibility timeout
    busy = await make_broker(visibility_timeout=0.5)
    await busy.publish(envelopes(1))
    async with busy.consume(["q"], prefetch=1) as consumer:
        running = await receive(consumer)
        # When another consumer watches the queue for over three timeouts
        watcher = await make_broker(visibility_timeout=0.5)
        async with watcher.consume(["q"], prefetch=1) as other:
            await nothing_for(other, 1.8)
            # Then it never got the message, which the first consumer can still acknowledge
            await running.ack()
            await nothing_for(other, 0.7)


@pytest.mark.slow
async def test_poison_message_is_dead_lettered_after_max_deliveries(
    make_broker: Factory, raw: aioredis.Redis
) -> None:
    # Given a message that kills every worker that takes it (two deliveries allowed)
    options = {"visibility_timeout": 0.3, "max_deliveries": 2}
    first = await make_broker(**options)
    await first.publish(envelopes(1))
    assert not (await receive(first.consume(["q"], prefetch=1))).redelivered
    await first.aclose()
    second = await make_broker(**options)
    assert (await receive(second.consume(["q"], prefetch=1))).redelivered
    await second.aclose()
    # When a third worker consumes the queue
    third = await make_broker(**options)
    async with third.consume(["q"], prefetch=1) as consumer:
        # Then it never gets the message, which ends in the dead-letter stream
        await nothing_for(consumer, 1.5)
    assert [e.id for e in await third.dead_letters("q")] == ["m0"]
    assert await raw.xlen(third.stream_key("q")) == 0


# -- ETA and purge ------------------------------------------------------------------------------


async def test_eta_waits_in_the_sorted_set_and_moves_when_due(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given a message due in 0.6 s
    eta = time.time() + 0.6
    await broker.publish(envelopes(1, eta=eta))
    # Then it waits in the sorted set, not in the stream
    assert await raw.zcard(broker.delayed_key("q")) == 1
    assert await raw.xlen(broker.stream_key("q")) == 0
    async with broker.consume(["q"], prefetch=1) as consumer:
        # When its time comes, then a consumer gets it, late by at most about half a second
        delivery = await receive(consumer, 3)
        assert eta <= time.time() < eta + 0.8
        assert (delivery.id, delivery.body) == ("m0", b"body 0")
        await delivery.ack()
    assert await raw.zcard(broker.delayed_key("q")) == 0


async def test_purge_counts_waiting_and_delayed_entries_and_leaves_held_ones(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given one message held by a consumer, two waiting and one delayed
    await broker.publish(envelopes(1))
    async with broker.consume(["q"], prefetch=1) as consumer:
        held = await receive(consumer)
        await broker.publish(envelopes(2) + envelopes(1, eta=time.time() + 60))
        # When the queue is purged, then three are deleted
        assert await broker.purge("q") == 3
        # And the held one can still be acknowledged
        await held.ack()
    assert await raw.xlen(broker.stream_key("q")) == 0


async def test_purge_of_a_queue_no_worker_has_read_deletes_everything(broker: RedisBroker) -> None:
    await broker.publish(envelopes(4))
    assert await broker.purge("q") == 4
    assert await broker.purge("never-used") == 0


# -- Connection loss ----------------------------------------------------------------------------


async def test_consumer_survives_client_kill_and_logs_once(
    broker: RedisBroker, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a consumer half way through 300 messages
    sent = envelopes(300)
    await broker.publish(sent)
    got: set[str] = set()
    async with broker.consume(["q"], prefetch=20) as consumer:
        assert isinstance(consumer, Consumer)
        name = consumer.name  # type: ignore[attr-defined]
        for _ in range(100):
            delivery = await receive(consumer)
            got.add(delivery.id)
            await delivery.ack()
        # When its connection is killed by the server
        caplog.set_level(logging.INFO, logger="aqueue.broker.redis")
        assert await kill_client(raw, name) == 1
        # Then it reconnects and receives the rest
        while len(got) < len(sent):
            delivery = await receive(consumer)
            got.add(delivery.id)
            await delivery.ack()
    assert got == {e.id for e in sent}
    warnings = [r for r in caplog.records if r.name == "aqueue.broker.redis" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "reconnecting" in warnings[0].getMessage()


async def test_entries_claimed_by_a_lost_reply_are_given_back(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    # Given a consumer blocked on an empty queue
    async with broker.consume(["q"], prefetch=10) as consumer:
        name = consumer.name  # type: ignore[attr-defined]
        await nothing_for(consumer, 0.3)
        waiting = asyncio.ensure_future(consumer.receive())
        await asyncio.sleep(0.1)
        # When the server hands it three entries in a reply that never arrives (claimed in its
        # name by another connection, then its connection is killed)
        stream = broker.stream_key("q")
        async with raw.pipeline(transaction=True) as pipe:
            for i in range(3):
                pipe.xadd(stream, {"body": f"body {i}", "content_type": JSON, "id": f"m{i}", "priority": ""})
            pipe.xreadgroup(GROUP, name, {stream: ">"}, count=10)
            await pipe.execute()
        assert await kill_client(raw, name) == 1
        # Then it gets them all anyway, well before the visibility timeout
        got = [await asyncio.wait_for(waiting, 5)] + [await receive(consumer) for _ in range(2)]
        assert sorted(d.id for d in got) == ["m0", "m1", "m2"]
        for delivery in got:
            await delivery.ack()
    assert await raw.xlen(stream) == 0


async def test_broadcast_reaches_subscribers_with_the_key_prefix(broker: RedisBroker, prefix: str) -> None:
    listener = aioredis.Redis.from_url(URL)
    pubsub = listener.pubsub()
    await pubsub.subscribe(f"{prefix}control")
    try:
        async with broker.subscribe("control") as messages:
            await broker.broadcast("control", b"ping")
            assert await asyncio.wait_for(anext(messages), 5) == b"ping"
        message = None
        for _ in range(20):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
            if message:
                break
        assert message is not None and message["data"] == b"ping"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()


async def test_subscriber_survives_client_kill(
    make_broker: Factory, raw: aioredis.Redis, unique: str
) -> None:
    # Given a subscriber whose connection the server kills
    broker = await make_broker(client_name=f"aq-{unique}")
    async with broker.subscribe("control") as messages:
        [subscriber] = [c for c in await raw.client_list() if c["name"] == f"aq-{unique}" and c["sub"] == "1"]
        await raw.client_kill_filter(_id=subscriber["id"])
        # When broadcasts go on, then it receives them again once reconnected
        receiving = asyncio.ensure_future(anext(messages))
        for _ in range(50):
            await broker.broadcast("control", b"ping")
            done, _ = await asyncio.wait([receiving], timeout=0.1)
            if done:
                break
        assert receiving.result() == b"ping"


@pytest.mark.slow
async def test_a_server_that_never_answers_raises_after_socket_timeout(
    silent_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a server that accepts connections and never answers
    broker = RedisBroker(silent_url, socket_timeout=0.3)
    try:
        # When publishing, then it fails with OperationalError after the timeout
        with pytest.raises(OperationalError, match="publish"):
            await asyncio.wait_for(broker.publish(envelopes(1)), 5)
        # And a consumer keeps waiting (and says so) instead of failing or hanging
        async with broker.consume(["q"], prefetch=1) as consumer:
            await nothing_for(consumer, 2.0)
        assert any("reconnecting" in r.getMessage() for r in caplog.records)
    finally:
        await broker.aclose()


async def test_closing_stops_a_claim_renewer_that_loses_a_cancellation(broker: RedisBroker) -> None:
    # Given a consumer whose claim renewer swallows its first cancellation, as redis-py can make it
    async with broker.consume(["q"], prefetch=1) as consumer:
        renewer, swallowed = stubborn_task()
        consumer._renewer = renewer  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        started = time.monotonic()
    # When it closed, then the renewer was stopped all the same, at once
    assert time.monotonic() - started < 5
    assert swallowed.is_set() and renewer.cancelled()
