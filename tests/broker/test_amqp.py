"""AMQPBroker against the real RabbitMQ on 127.0.0.1:5672 (guest/guest)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import pytest

from aqueue.broker.amqp import AMQPBroker, amqp_url, delay_bucket_ms
from aqueue.broker.base import Consumer, Delivery
from aqueue.exceptions import ImproperlyConfigured, InvalidURL, OperationalError
from aqueue.message import Envelope
from aqueue.queues import QueueDeclarations
from tests.conftest import rabbitmqctl, require_server

URL = "amqp://guest:guest@127.0.0.1:5672//"
JSON = "application/json"


@pytest.fixture
def queue(unique: str) -> str:
    return f"t-amqp-{unique}"


@pytest.fixture
async def broker(queue: str) -> AsyncIterator[AMQPBroker]:
    require_server("amqp")
    async with AMQPBroker(URL) as b:
        yield b
        await b.delete_queue(queue)


def envelopes(queue: str, n: int, eta: float | None = None) -> list[Envelope]:
    return [Envelope(f"m{i}", queue, f"body {i}".encode(), JSON, eta) for i in range(n)]


async def receive(consumer: Consumer, timeout: float = 5.0) -> Delivery:
    return await asyncio.wait_for(consumer.receive(), timeout)


async def ready_count(broker: AMQPBroker, queue: str) -> int:
    channel = await broker.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True, robust=False)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def get_one(broker: AMQPBroker, queue: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    channel = await broker.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True, robust=False)
        return await declared.get(no_ack=True, fail=False)
    finally:
        await channel.close()


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- URLs and options ---------------------------------------------------------------------------


def test_celery_style_url_means_vhost_slash_with_guest_defaults() -> None:
    # Given Celery's first-steps URL, with the pyamqp alias and no password
    url = amqp_url("pyamqp://guest@127.0.0.1//")
    # Then aio-pika gets amqp, the default password and port, and the vhost "/"
    assert (url.scheme, url.user, url.password, url.port, url.path) == ("amqp", "guest", "guest", 5672, "//")


@pytest.mark.parametrize(
    ("given", "scheme", "port", "path"),
    [
        ("amqp://127.0.0.1", "amqp", 5672, "//"),
        ("amqp://u:p@127.0.0.1:5673/jobs", "amqp", 5673, "/jobs"),
        ("amqp://127.0.0.1/%2Fjobs", "amqp", 5672, "//jobs"),
        ("amqps://127.0.0.1//", "amqps", 5671, "//"),
    ],
)
def test_url_parts(given: str, scheme: str, port: int, path: str) -> None:
    url = amqp_url(given)
    assert (url.scheme, url.port, url.path) == (scheme, port, path)


def test_other_schemes_are_refused() -> None:
    with pytest.raises(InvalidURL):
        AMQPBroker("redis://127.0.0.1")


def test_unknown_option_names_the_closest() -> None:
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'confirm_publish'"):
        AMQPBroker(URL, confirm_publsh=False)


def test_bad_max_priority() -> None:
    with pytest.raises(ImproperlyConfigured, match="max_priority"):
        AMQPBroker(URL, max_priority=1000)


async def test_unreachable_broker_is_an_operational_error_without_the_password() -> None:
    # Given nothing listening on port 1 of the loopback address
    broker = AMQPBroker("amqp://user:s3cret@127.0.0.1:1//", connect_timeout=2)
    # When publishing, then OperationalError says so, with the password masked
    with pytest.raises(OperationalError) as caught:
        await broker.publish(envelopes("nowhere", 1))
    assert "s3cret" not in str(caught.value)
    assert "user:**@127.0.0.1:1" in str(caught.value)
    assert "s3cret" not in repr(broker)


async def test_pyamqp_alias_connects(queue: str) -> None:
    require_server("amqp")
    # Given Celery's URL shape on the loopback address
    async with AMQPBroker("pyamqp://guest@127.0.0.1//") as broker:
        try:
            # When publishing, then it lands in the queue
            await broker.publish(envelopes(queue, 2))
            assert await ready_count(broker, queue) == 2
        finally:
            await broker.delete_queue(queue)


# -- publish and consume ------------------------------------------------------------------------


async def test_round_trip(broker: AMQPBroker, queue: str) -> None:
    # Given three published messages
    await broker.publish(envelopes(queue, 3))
    # When a consumer receives them
    async with broker.consume([queue], prefetch=10) as consumer:
        got = [await receive(consumer) for _ in range(3)]
        for delivery in got:
            await delivery.ack()
    # Then they arrive in order, first-time deliveries, and are gone once acknowledged
    assert [(d.id, d.queue, d.body, d.content_type, d.redelivered) for d in got] == [
        (f"m{i}", queue, f"body {i}".encode(), JSON, False) for i in range(3)
    ]
    assert await ready_count(broker, queue) == 0


async def test_celery_layout(broker: AMQPBroker, queue: str) -> None:
    # Given a published message
    await broker.publish(envelopes(queue, 1))
    channel = await broker.channel()
    try:
        # Then the durable direct exchange named like the queue routes to it with that routing key
        exchange = await channel.get_exchange(queue)
        await exchange.publish(aio_pika.Message(b"raw"), routing_key=queue)
        declared = await channel.declare_queue(queue, passive=True, robust=False)
        first = await declared.get(no_ack=True)
        assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    finally:
        await channel.close()
    await until(lambda: _equals(ready_count(broker, queue), 1))


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_prefetch_is_the_qos_window(broker: AMQPBroker, queue: str) -> None:
    # Given ten messages and a consumer with prefetch 3
    await broker.publish(envelopes(queue, 10))
    async with broker.consume([queue], prefetch=3) as consumer:
        held = [await receive(consumer) for _ in range(3)]
        await asyncio.sleep(0.3)
        # Then RabbitMQ delivered only three: seven are still ready in the queue
        assert await ready_count(broker, queue) == 7
        # And acknowledging one lets exactly one more through
        await held[0].ack()
        await receive(consumer)
        await until(lambda: _equals(ready_count(broker, queue), 6))


async def test_reject_dead_letters(broker: AMQPBroker, queue: str) -> None:
    # Given a received message with headers
    envelope = Envelope(
        "m0", queue, b"body 0", JSON, priority=3, headers={"task": "t", "id": "m0"}, reply_to="r"
    )
    await broker.publish([envelope])
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await receive(consumer)
        # When it is rejected
        await delivery.reject()

        # Then a copy, headers and properties included, waits in the dead-letter queue
        async def dead() -> bool:
            return await ready_count(broker, f"{queue}.dead") == 1

        await until(dead)
    copy = await get_one(broker, f"{queue}.dead")
    assert copy is not None
    assert (copy.body, copy.headers, copy.priority, copy.reply_to) == (b"body 0", envelope.headers, 3, "r")
    # And the original was acknowledged once the copy was confirmed: nothing is left in the queue
    assert await ready_count(broker, queue) == 0


async def test_a_policy_sends_what_a_celery_worker_rejects_to_the_dead_letter_queue(
    broker: AMQPBroker, queue: str
) -> None:
    # Given the queue, and the policy the README gives for it (a policy does not change its declaration)
    await broker.publish(envelopes(queue, 1))
    policy = f"dead-letters-{queue}"
    definition = f'{{"dead-letter-exchange": "", "dead-letter-routing-key": "{queue}.dead"}}'
    await rabbitmqctl("set_policy", "--apply-to", "queues", policy, f"^{queue}$", definition)
    try:
        # When a consumer rejects the message without requeueing it, as a Celery worker rejects a task
        # it cannot run
        channel = await broker.channel()
        try:
            declared = await channel.declare_queue(queue, durable=True, robust=False)
            message = await declared.get(no_ack=False, timeout=5)
            await message.reject(requeue=False)
        finally:
            await channel.close()
        # Then RabbitMQ puts it in the dead-letter queue
        await until(lambda: _equals(ready_count(broker, f"{queue}.dead"), 1))
    finally:
        await rabbitmqctl("clear_policy", policy)


async def test_queues_are_declared_without_arguments_as_celery_declares_them(
    broker: AMQPBroker, queue: str
) -> None:
    # Given a published message
    await broker.publish(envelopes(queue, 1))
    # Then a declaration without arguments, Celery's, agrees with the queue and its dead-letter queue
    channel = await broker.channel()
    try:
        for name in (queue, f"{queue}.dead"):
            await channel.declare_queue(name, durable=True, robust=False)
    finally:
        await channel.close()


async def test_requeue_redelivers(broker: AMQPBroker, queue: str) -> None:
    # Given a received message
    await broker.publish(envelopes(queue, 1))
    async with broker.consume([queue], prefetch=1) as consumer:
        first = await receive(consumer)
        # When it is requeued
        await first.requeue()
        # Then it comes again, flagged as redelivered
        again = await receive(consumer)
        assert (again.id, again.redelivered) == (first.id, True)
        await again.ack()


async def test_a_resent_envelope_comes_as_a_redelivery(broker: AMQPBroker, queue: str) -> None:
    # Given an envelope sent again by a publish retry, after a plain one
    await broker.publish([Envelope("m0", queue, b"x", JSON), Envelope("m1", queue, b"y", JSON, resent=True)])
    # Then it is delivered as a redelivery (the worker checks it did not run already)
    async with broker.consume([queue], prefetch=2) as consumer:
        got = [await receive(consumer), await receive(consumer)]
        assert [(d.id, d.redelivered) for d in got] == [("m0", False), ("m1", True)]
        for delivery in got:
            await delivery.ack()


async def test_purge_counts(broker: AMQPBroker, queue: str) -> None:
    await broker.publish(envelopes(queue, 4))
    await broker.publish(envelopes(queue, 2, eta=time.time() + 60))
    assert await broker.purge(queue) == 6
    assert await broker.purge(queue) == 0


async def test_purge_of_unknown_queue_is_zero(broker: AMQPBroker, queue: str) -> None:
    assert await broker.purge(f"{queue}-never-declared") == 0


async def test_max_priority(queue: str) -> None:
    require_server("amqp")
    async with AMQPBroker(URL, max_priority=5) as broker:
        try:
            # Given low then high priority messages in a priority queue
            await broker.publish([Envelope("low", queue, b"", JSON, priority=1)])
            await broker.publish([Envelope("high", queue, b"", JSON, priority=5)])
            # Then the high one is delivered first
            async with broker.consume([queue], prefetch=1) as consumer:
                first = await receive(consumer)
                await first.ack()
                assert first.id == "high"
                await (await receive(consumer)).ack()
        finally:
            await broker.delete_queue(queue)


async def test_without_publisher_confirms(queue: str) -> None:
    require_server("amqp")
    async with AMQPBroker(URL, confirm_publish=False) as broker:
        try:
            await broker.publish(envelopes(queue, 3))
            await until(lambda: _equals(ready_count(broker, queue), 3))
        finally:
            await broker.delete_queue(queue)


async def test_existing_queue_with_other_arguments_is_used_as_is(
    broker: AMQPBroker, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a queue declared elsewhere with an argument this broker does not declare
    channel = await broker.channel()
    await channel.declare_queue(queue, durable=True, robust=False, arguments={"x-max-length": 100})
    await channel.close()
    # When publishing to it and consuming from it
    await broker.publish(envelopes(queue, 1))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await receive(consumer)
        await delivery.ack()
    # Then it works, with a warning that the queue is used as it is
    assert delivery.id == "m0"
    assert "exists with other arguments" in caplog.text


# -- ETA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.001, 0.05, 0.1, 1.0, 1.5, 60.0, 3600.0, 86400.0 * 365])
def test_delay_bucket_never_exceeds_the_delay(seconds: float) -> None:
    ms = delay_bucket_ms(seconds)
    assert ms == 64 or ms <= seconds * 1000
    assert ms >= min(seconds * 1000 * 7 / 8, 2**31) or ms == 64


async def test_eta_is_not_early(broker: AMQPBroker, queue: str) -> None:
    # Given a message due in 1.2 s
    eta = time.time() + 1.2
    await broker.publish(envelopes(queue, 1, eta=eta))
    async with broker.consume([queue], prefetch=4) as consumer:
        # When it is received
        delivery = await receive(consumer, timeout=5)
        received_at = time.time()
        await delivery.ack()
    # Then not before its ETA, and soon after it
    assert eta <= received_at < eta + 1.0
    assert delivery.id == "m0"


async def test_eta_flood_does_not_fill_the_prefetch_window(broker: AMQPBroker, queue: str) -> None:
    # Given many messages due later, then one due now
    await broker.publish(envelopes(queue, 50, eta=time.time() + 30))
    await broker.publish([Envelope("now", queue, b"", JSON)])
    # When a consumer with a small window starts
    async with broker.consume([queue], prefetch=2) as consumer:
        started = time.monotonic()
        delivery = await receive(consumer, timeout=3)
        await delivery.ack()
    # Then the due message comes at once
    assert delivery.id == "now"
    assert time.monotonic() - started < 1.0


async def test_a_celery_eta_header_is_honoured(broker: AMQPBroker, queue: str) -> None:
    # Given a message with Celery's eta header (ISO 8601), due in 1.2 s, published straight to the queue
    # as a Celery client publishes it
    eta = time.time() + 1.2
    headers = {"task": "tasks.add", "id": "c0", "eta": datetime.fromtimestamp(eta, UTC).isoformat()}
    await broker.publish([Envelope("c0", queue, b"[[], {}, {}]", JSON, headers=headers)])
    async with broker.consume([queue], prefetch=4) as consumer:
        # When it is received, then not before its eta, with its headers
        delivery = await receive(consumer, timeout=5)
        received_at = time.time()
        await delivery.ack()
    assert eta <= received_at < eta + 1.0
    assert delivery.headers is not None and delivery.headers["eta"] == headers["eta"]


# -- quorum queues ------------------------------------------------------------------------------


def quorum_broker(**declarations: Any) -> AMQPBroker:
    return AMQPBroker(
        URL, queues=QueueDeclarations(default_type="quorum", missing_type="quorum", **declarations)
    )


@pytest.fixture
async def quorum(queue: str) -> AsyncIterator[AMQPBroker]:
    require_server("amqp")
    async with quorum_broker() as b:
        yield b
        await b.delete_queue(queue)
        await b.delete_queue(f"{queue}-classic")


async def queue_type(broker: AMQPBroker, name: str) -> str:
    """``quorum`` when a quorum declaration of ``name`` agrees with it, else ``classic``."""
    channel = await broker.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"}, robust=False)
        return "quorum"
    except aiormq.exceptions.ChannelPreconditionFailed:
        return "classic"
    finally:
        if not channel.is_closed:
            await channel.close()


async def test_quorum_queues_and_their_dead_letters_are_quorum_queues(quorum: AMQPBroker, queue: str) -> None:
    # Given a message in a quorum queue
    await quorum.publish(envelopes(queue, 1))
    # Then the queue and its dead-letter queue are quorum queues, as Celery declares them
    assert [await queue_type(quorum, name) for name in (queue, f"{queue}.dead")] == ["quorum", "quorum"]
    # And a rejected message reaches the dead-letter queue
    async with quorum.consume([queue], prefetch=1) as consumer:
        await (await receive(consumer)).reject()
        await until(lambda: _equals(ready_count(quorum, f"{queue}.dead"), 1))
    assert await ready_count(quorum, queue) == 0


async def test_one_consumer_takes_from_classic_and_quorum_queues(quorum: AMQPBroker, queue: str) -> None:
    # Given a classic and a quorum queue, a message in each
    classic = f"{queue}-classic"
    quorum.layout.declarations = QueueDeclarations(default_queue=queue, default_type="quorum")
    await quorum.publish([Envelope("q", queue, b"", JSON), Envelope("c", classic, b"", JSON)])
    assert [await queue_type(quorum, name) for name in (queue, classic)] == ["quorum", "classic"]
    # When one consumer (one channel, its own prefetch: no global QoS, which quorum queues refuse) takes both
    async with quorum.consume([queue, classic], prefetch=2) as consumer:
        got = {(await receive(consumer)).id for _ in range(2)}
    # Then it got both
    assert got == {"q", "c"}


async def test_countdowns_on_a_quorum_queue_wait_in_quorum_delay_queues(
    quorum: AMQPBroker, queue: str
) -> None:
    # Given a message due in 1.2 s on a quorum queue
    eta = time.time() + 1.2
    await quorum.publish(envelopes(queue, 1, eta=eta))
    # Then it waits in a quorum delay queue, which dead-letters at least once
    (ttl,) = quorum.layout.delays[queue]
    channel = await quorum.channel()
    try:
        arguments = {
            "x-queue-type": "quorum", "x-message-ttl": ttl, "x-expires": ttl + 600_000,
            "x-dead-letter-exchange": queue, "x-dead-letter-routing-key": queue,
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
        }  # fmt: skip
        await channel.declare_queue(f"{queue}.delay.{ttl}", durable=True, arguments=arguments, robust=False)
    finally:
        await channel.close()
    # And it is delivered, not before its time
    async with quorum.consume([queue], prefetch=1) as consumer:
        delivery = await receive(consumer, timeout=5)
        received_at = time.time()
        await delivery.ack()
    assert eta <= received_at < eta + 1.0


async def test_a_quorum_queue_is_declared_without_priorities(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given task_queue_max_priority with quorum queues, which RabbitMQ 3 gives no priorities
    require_server("amqp")
    async with quorum_broker(max_priority=5) as broker:
        try:
            # When a message is published, then the queue is declared without x-max-priority, with a warning
            await broker.publish([Envelope("p", queue, b"", JSON, priority=5)])
            assert await ready_count(broker, queue) == 1
            assert "quorum queue: RabbitMQ 3 has no priorities" in caplog.text
        finally:
            await broker.delete_queue(queue)


# -- broadcast ----------------------------------------------------------------------------------


async def test_broadcast_reaches_every_subscriber(broker: AMQPBroker, unique: str) -> None:
    channel = f"control-{unique}"
    async with broker.subscribe(channel) as first, broker.subscribe(channel) as second:
        # When a message is broadcast
        await broker.broadcast(channel, b"ping")
        # Then both subscribers receive it
        assert await asyncio.wait_for(anext(first), 5) == b"ping"
        assert await asyncio.wait_for(anext(second), 5) == b"ping"
        # And a subscriber of another channel does not
        async with broker.subscribe(f"{channel}-other") as other:
            await broker.broadcast(channel, b"again")
            assert await asyncio.wait_for(anext(first), 5) == b"again"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(other), 0.3)


# -- reconnection -------------------------------------------------------------------------------


async def test_consuming_survives_close_all_connections(
    vhost: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aqueue.broker.amqp")
    async with AMQPBroker(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as broker:
        # Given 20 confirmed messages, five of them acknowledged
        await broker.publish(envelopes(queue, 20))
        seen: set[str] = set()
        async with broker.consume([queue], prefetch=5) as consumer:
            for _ in range(5):
                delivery = await receive(consumer)
                await delivery.ack()
                seen.add(delivery.id)
            # When RabbitMQ closes every connection of the vhost
            await rabbitmqctl("close_all_connections", "-p", vhost, "aqueue test")
            # Then publishing works again once reconnected
            await until(lambda: _publishes(broker, queue), timeout=15)
            # And consuming continues until every confirmed message has been seen
            deadline = time.monotonic() + 20
            while len(seen) < 21:
                assert time.monotonic() < deadline, f"missing {21 - len(seen)} messages"
                delivery = await receive(consumer, timeout=20)
                await delivery.ack()
                seen.add(delivery.id)
    assert seen == {f"m{i}" for i in range(20)} | {"after"}
    # And the broker said once that it lost the connection, and once that it was back
    said = [r.getMessage() for r in caplog.records if r.name == "aqueue.broker.amqp"]
    assert [m for m in said if "the connection was lost" in m] == [
        f"RabbitMQ amqp://guest:**@127.0.0.1:5672/{vhost}: the connection was lost "
        "([Errno 320] CONNECTION_FORCED - aqueue test); reconnecting"
    ]
    assert [m for m in said if m.endswith("reconnected")] == [
        f"RabbitMQ amqp://guest:**@127.0.0.1:5672/{vhost}: reconnected"
    ]


async def _publishes(broker: AMQPBroker, queue: str) -> bool:
    try:
        await broker.publish([Envelope("after", queue, b"", JSON)])
    except OperationalError:
        return False
    return True
