"""KombuRedisBroker against the real Redis: kombu's layout as Celery 5.7 writes it, and its own delivery.

Golden data (tests/golden/celery_redis.json) was captured from a real Celery 5.7 client on Redis by
``tests/golden/capture_celery_redis.py``: the messages it pushed (plain, with options, an eta, priority 9,
a link, a chain), its binding sets, and how kombu holds a message and gives it back. kombu itself (the
library Celery uses, run in a thread here) takes, holds and restores messages beside aqueue's consumers.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqueue import App
from aqueue.broker import from_url
from aqueue.broker.redis_kombu import KombuRedisBroker, opened
from aqueue.exceptions import ImproperlyConfigured, OperationalError
from aqueue.message import Envelope
from aqueue.protocol import CELERY
from tests.broker.test_redis import kill_client, nothing_for, receive
from tests.cli.conftest import subprocess_env
from tests.conftest import REDIS_URL, RedisServer
from tests.golden.calls import OPTIONS
from tests.stubborn import stubborn_task

URL = f"{REDIS_URL}/0"
JSON = "application/json"
ACCEPT = frozenset({JSON})
GOLDEN: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "golden" / "celery_redis.json").read_text()
)
MESSAGES: dict[str, dict[str, Any]] = GOLDEN["messages"]
IDS = {"id", "root_id", "parent_id", "origin", "eta", "expires"}
"""Header values that differ between two sends: ids, times, the sender's node name."""
PROPERTY_IDS = {"correlation_id", "reply_to", "delivery_tag", "expiration"}
"""Property values that differ between two sends (``expiration`` is milliseconds left at the send)."""
Factory = Callable[..., Awaitable[KombuRedisBroker]]


@pytest.fixture
async def make_broker(prefix: str, raw: aioredis.Redis) -> AsyncIterator[Factory]:
    opened_brokers: list[KombuRedisBroker] = []

    async def make(**options: Any) -> KombuRedisBroker:
        broker = KombuRedisBroker(URL, global_keyprefix=prefix, **options)
        await broker.connect()
        opened_brokers.append(broker)
        return broker

    yield make
    for broker in opened_brokers:
        await broker.aclose()


@pytest.fixture
async def broker(make_broker: Factory) -> KombuRedisBroker:
    return await make_broker(claim_timeout=1.0)


def captured(label: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(MESSAGES[label]["raw"])
    return payload


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decoded_body(payload: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(payload["body"]))


def kombu_connection(prefix: str, **options: Any) -> Any:
    """kombu's own Redis transport (Celery's) on the test's prefix."""
    kombu: Any = importlib.import_module("kombu")
    return kombu.Connection(URL, transport_options={"global_keyprefix": prefix, **options})


# Golden: what Celery writes decodes -----------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(MESSAGES))
def test_every_captured_celery_message_decodes(label: str) -> None:
    # Given a message a Celery client pushed to Redis; when the consumer opens it and the codec decodes it
    payload = captured(label)
    envelope, again = opened("q", MESSAGES[label]["raw"].encode())
    message = CELERY.decode(
        envelope.body, envelope.content_type, envelope.headers, ACCEPT, {"priority": envelope.priority}
    )
    # Then it is the task and the call Celery sent
    args, kwargs, embed = decoded_body(payload)
    headers = payload["headers"]
    assert (message.id, message.task, list(message.args), message.kwargs) == (
        headers["id"],
        headers["task"],
        args,
        kwargs,
    )
    assert (message.callbacks, message.chain) == (embed["callbacks"], embed["chain"])
    assert message.priority == payload["properties"]["priority"]
    assert envelope.reply_to == payload["properties"]["reply_to"] and not again


def test_a_given_back_message_is_redelivered_and_its_mark_is_no_custom_header() -> None:
    envelope, again = opened("q", GOLDEN["held"]["restored"].encode())
    assert again and envelope.headers is not None and "redelivered" not in envelope.headers


# Golden: what aqueue writes is Celery's -------------------------------------------------------------


async def test_aqueue_pushes_celerys_envelopes_to_celerys_lists(
    prefix: str, raw: aioredis.Redis, unique: str
) -> None:
    # Given an aqueue app in kombu's layout, on a queue of its own
    queue = GOLDEN["queue"].replace(GOLDEN["queue"][len("gold-capture-") :], unique)
    app = App(
        "gold",
        broker=URL,
        backend=URL,
        task_default_queue=queue,
        broker_transport_options={"layout": "kombu", "global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
    )
    async with app:
        # When it sends the calls the Celery client sent
        await app.send_task("goldtasks.add", (4, 4))
        await app.send_task("goldtasks.add", (2, 3), {"z": 1}, **OPTIONS)
        await app.send_task("goldtasks.add", (9, 9), priority=9)
    # Then the keys are Celery's: its lists, one per priority step, and its binding sets
    keys = sorted(
        text(k)[len(prefix) :] for k in await raw.keys(f"{prefix}*") if "celery-task" not in text(k)
    )
    expected = sorted(k.replace(GOLDEN["queue"], queue) for k in GOLDEN["keys"])
    assert [k for k in keys if not k.startswith("aqueue.")] == expected
    for key, members in GOLDEN["bindings"].items():
        mine = {text(m) for m in await raw.smembers(prefix + key.replace(GOLDEN["queue"], queue))}
        assert mine == {m.replace(GOLDEN["queue"], queue) for m in members}
    # And each envelope equals Celery's field by field (ids and times aside), in the same list
    for label in ("delay", "options", "priority_9"):
        suffix = MESSAGES[label]["list_suffix"]
        [item] = await raw.lrange(f"{prefix}{queue}{suffix}", 0, -1)
        mine, celery = json.loads(item), captured(label)
        assert mine.keys() == celery.keys()
        for field in ("content-encoding", "content-type"):
            assert mine[field] == celery[field]
        assert {k: v for k, v in mine["headers"].items() if k not in IDS} == {
            k: v for k, v in celery["headers"].items() if k not in IDS and k != "shadow"
        } | {"shadow": None}
        for name in ("eta", "expires"):  # times: set in the same places, as ISO 8601 with a zone
            mine_time, celery_time = mine["headers"][name], celery["headers"][name]
            assert (mine_time is None) == (celery_time is None)
            assert mine_time is None or datetime.fromisoformat(mine_time).tzinfo is not None
        assert ("expiration" in mine["properties"]) == ("expiration" in celery["properties"])
        celery_info = celery["properties"]["delivery_info"] | {"routing_key": queue}
        assert mine["properties"]["delivery_info"] == celery_info
        mine_props = {k: v for k, v in mine["properties"].items() if k not in PROPERTY_IDS}
        celery_props = {k: v for k, v in celery["properties"].items() if k not in PROPERTY_IDS}
        assert mine_props == celery_props | {"delivery_info": celery_info}
        assert mine["properties"].keys() - {"reply_to"} == celery["properties"].keys() - {"reply_to"}
        assert decoded_body(mine) == decoded_body(celery)


# Holding, acknowledging, giving back ----------------------------------------------------------------


async def test_a_taken_message_is_held_as_kombu_holds_it_and_ack_removes_it(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str
) -> None:
    # Given a message taken by an aqueue consumer
    await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])
    async with broker.consume(["q"], prefetch=1) as consumer:
        delivery = await receive(consumer)
        # Then kombu's hash holds [payload, exchange, routing key] under its tag, scored in the index
        value = json.loads(await raw.hget(f"{prefix}unacked", delivery.tag) or "null")
        golden = json.loads(GOLDEN["held"]["unacked"])
        assert [type(v) for v in value] == [type(v) for v in golden] and value[1:] == ["", "q"]
        assert value[0]["properties"]["delivery_tag"] == delivery.tag
        assert isinstance(await raw.zscore(f"{prefix}unacked_index", delivery.tag), float)
        # When it is acknowledged, then nothing of it is left
        await delivery.ack()
    assert await raw.hlen(f"{prefix}unacked") == 0
    assert await raw.zcard(f"{prefix}unacked_index") == await raw.zcard(f"{prefix}aqueue.unacked_claims") == 0
    assert await raw.llen(f"{prefix}q") == 0


async def test_requeue_gives_it_back_first_marked_as_kombu_marks_it(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str
) -> None:
    await broker.publish([Envelope(f"m{i}", "q", b"[[], {}, {}]", JSON) for i in range(2)])
    async with broker.consume(["q"], prefetch=1) as consumer:
        first = await receive(consumer)
        await first.requeue()
        [item] = [i for i in await raw.lrange(f"{prefix}q", 0, -1) if b'"m0"' in i]
        marks = json.loads(item)
        assert marks["headers"]["redelivered"] is marks["properties"]["delivery_info"]["redelivered"] is True
        again = await receive(consumer)
        assert (again.id, again.redelivered) == ("m0", True)
        await again.ack()
        assert (await receive(consumer)).id == "m1"


async def test_a_lower_priority_number_is_taken_first_as_on_celery(broker: KombuRedisBroker) -> None:
    await broker.publish([Envelope(f"p{p}", "q", b"[[], {}, {}]", JSON, priority=p) for p in (9, 5, 0)])
    async with broker.consume(["q"], prefetch=1) as consumer:
        order = []
        for _ in range(3):
            delivery = await receive(consumer)
            order.append(delivery.id)
            await delivery.ack()
    assert order == ["p0", "p5", "p9"]


async def test_a_killed_workers_message_runs_again_after_the_claim_timeout(
    broker: KombuRedisBroker, prefix: str, tmp_path: Path
) -> None:
    # Given a worker process that took a message, killed with SIGKILL while holding it
    await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])
    script = tmp_path / "take.py"
    script.write_text(
        "import asyncio, sys\nfrom aqueue.broker.redis_kombu import KombuRedisBroker\n"
        "async def main():\n"
        f"    broker = KombuRedisBroker({URL!r}, global_keyprefix={prefix!r}, claim_timeout=1.0)\n"
        "    consumer = broker.consume(['q'], 1)\n"
        "    delivery = await asyncio.wait_for(consumer.receive(), 10)\n"
        "    print(delivery.id, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=subprocess_env())
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        assert line.strip() == b"m1"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        # When another consumer runs, then it gets the message again, marked redelivered
        async with broker.consume(["q"], prefetch=1) as consumer:
            delivery = await receive(consumer, timeout=10)
            assert (delivery.id, delivery.redelivered) == ("m1", True)
            await delivery.ack()
        assert time.monotonic() - killed < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
async def test_a_long_task_is_renewed_not_given_back(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str
) -> None:
    # Given a consumer holding a message past three claim timeouts
    await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])
    async with broker.consume(["q"], prefetch=1) as holder, broker.consume(["q"], prefetch=1) as other:
        held = await receive(holder)
        taken = await raw.zscore(f"{prefix}unacked_index", held.tag)
        # Then no other consumer gets it meanwhile, and its score in kombu's index moves on (so Celery's
        # workers do not give it back either)
        await nothing_for(other, 3.5)
        renewed = await raw.zscore(f"{prefix}unacked_index", held.tag)
        assert taken is not None and renewed is not None and renewed > taken + 0.5
        await held.ack()


async def test_kombu_gives_back_a_message_an_aqueue_worker_left(make_broker: Factory, prefix: str) -> None:
    # Given an aqueue consumer that took a message and died (it stops renewing, gives nothing back)
    broker = await make_broker(claim_timeout=60.0)
    await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])
    dead = broker.consume(["q"], prefetch=1)
    await receive(dead)
    await dead._shutdown()  # type: ignore[attr-defined]
    await asyncio.sleep(0.6)

    # When a Celery worker's kombu restores what was held past its visibility timeout
    def restore() -> None:
        with kombu_connection(prefix, visibility_timeout=0.5) as connection:
            connection.default_channel.qos.restore_visible(num=100, interval=1)

    await asyncio.to_thread(restore)
    # Then an aqueue consumer gets it again, redelivered
    async with broker.consume(["q"], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert (delivery.id, delivery.redelivered) == ("m1", True)
        await delivery.ack()


async def test_aqueue_gives_back_a_message_a_celery_worker_left(make_broker: Factory, prefix: str) -> None:
    # Given a message that kombu (a Celery worker) took and never acknowledged, past the visibility timeout
    broker = await make_broker(visibility_timeout=0.5)
    await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])

    def take() -> str:
        with kombu_connection(prefix) as connection:
            channel = connection.default_channel
            message = channel.basic_get("q", no_ack=False)
            channel.do_restore = False  # as a killed worker: nothing given back on close
            return str(message.delivery_tag)

    tag = await asyncio.to_thread(take)
    await asyncio.sleep(0.6)
    # When an aqueue consumer runs, then it gives it back and gets it, redelivered, under a new tag (so
    # that a late ack of the old holder cannot remove the new hold)
    async with broker.consume(["q"], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert (delivery.id, delivery.redelivered) == ("m1", True) and delivery.tag != tag
        await delivery.ack()


async def test_kombu_takes_what_aqueue_publishes_and_aqueue_what_kombu_publishes(
    broker: KombuRedisBroker, prefix: str
) -> None:
    await broker.publish([Envelope("m1", "q", b'{"a": 1}', JSON, priority=5)])

    def kombu_side() -> tuple[bytes, int]:
        with kombu_connection(prefix) as connection:
            channel = connection.default_channel
            message = channel.basic_get("q", no_ack=True)
            producer = connection.Producer()
            producer.publish({"b": 2}, routing_key="q", headers={"id": "k1"}, priority=3)
            return message.body, message.properties["priority"]

    assert await asyncio.to_thread(kombu_side) == (b'{"a": 1}', 5)
    async with broker.consume(["q"], prefetch=1) as consumer:
        delivery = await receive(consumer)
        assert (delivery.id, json.loads(delivery.body), delivery.content_type) == ("k1", {"b": 2}, JSON)
        await delivery.ack()


# Bad input, shutdown, options -----------------------------------------------------------------------


async def test_a_message_that_is_no_envelope_is_dead_lettered_and_logged(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given garbage pushed to the queue's list before a good message
    garbage = [b"not json", b'{"properties": {}}', b'{"body": "%%%", "properties": {"delivery_tag": "t1", '
               b'"body_encoding": "base64"}, "content-type": "application/json"}']  # fmt: skip
    await raw.lpush(f"{prefix}q", *garbage)
    await broker.publish([Envelope("good", "q", b"[[], {}, {}]", JSON)])
    # When a consumer takes from it
    with caplog.at_level(logging.ERROR, logger="aqueue.broker.redis"):
        async with broker.consume(["q"], prefetch=1) as consumer:
            delivery = await receive(consumer)
            await delivery.ack()
    # Then the good one is delivered, and the garbage is in the dead-letter list as it was, logged
    assert delivery.id == "good"
    assert sorted(await raw.lrange(f"{prefix}q.dead", 0, -1)) == sorted(garbage)
    assert caplog.text.count("Rejecting unreadable message of queue 'q'") == 3
    assert await raw.hlen(f"{prefix}unacked") == 0
    assert [e.body for e in await broker.dead_letters("q")] == garbage


async def test_a_message_waiting_for_its_eta_is_given_back_on_close(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str
) -> None:
    await broker.publish([Envelope("later", "q", b"[[], {}, {}]", JSON, eta=time.time() + 60)])
    async with broker.consume(["q"], prefetch=1) as consumer:
        await nothing_for(consumer, 0.5)
        assert await raw.llen(f"{prefix}q") == 0 and await raw.hlen(f"{prefix}unacked") == 1
    assert await raw.llen(f"{prefix}q") == 1 and await raw.hlen(f"{prefix}unacked") == 0


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("round_robin", ["b1", "a1", "b2", "a2"]),  # each queue first in turn, starting with the first named
        ("priority", ["b1", "b2", "a1", "a2"]),  # the first named, while it has any
        ("sorted", ["a1", "a2", "b1", "b2"]),  # by name
    ],
)
async def test_queue_order_strategy_chooses_the_queue_taken_from_first(
    make_broker: Factory, strategy: str, expected: list[str]
) -> None:
    broker = await make_broker(queue_order_strategy=strategy)
    await broker.publish([Envelope(f"{q}{i}", q, b"[[], {}, {}]", JSON) for q in "ab" for i in (1, 2)])
    async with broker.consume(["b", "a"], prefetch=1) as consumer:
        order = []
        for _ in range(4):
            delivery = await receive(consumer)
            order.append(delivery.id)
            await delivery.ack()
    assert order == expected


def test_the_layout_is_chosen_by_a_transport_option() -> None:
    assert isinstance(from_url(URL, {"layout": "kombu"}), KombuRedisBroker)
    assert not isinstance(from_url(URL, {}), KombuRedisBroker)
    with pytest.raises(ImproperlyConfigured, match=r"'streams' .* and 'kombu'"):
        from_url(URL, {"layout": "lists"})
    with pytest.raises(ImproperlyConfigured, match=r"Redis Cluster .* Streams only: kombu's layout is not"):
        from_url("redis+cluster://127.0.0.1:7000", {"layout": "kombu"})
    with pytest.raises(ImproperlyConfigured, match="priority_steps"):
        KombuRedisBroker(URL, priority_steps=[3, 6])
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'visibility_timeout'"):
        KombuRedisBroker(URL, visibilty_timeout=5)
    with pytest.raises(ImproperlyConfigured, match="sep"):
        KombuRedisBroker(URL, sep=":")
    with pytest.raises(ImproperlyConfigured, match="queue_order_strategy 'fifo': use one of 'round_robin'"):
        KombuRedisBroker(URL, queue_order_strategy="fifo")
    # A Celery app's tuning of kombu's own restore sweeps is accepted as it is
    KombuRedisBroker(
        URL, unacked_restore_interval=5, unacked_mutex_expire=60, queue_order_strategy="priority"
    )


# Outages --------------------------------------------------------------------------------------------


async def test_an_idle_consumer_survives_a_client_kill_and_logs_once(
    broker: KombuRedisBroker, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a consumer waiting on an empty queue
    async with broker.consume(["q"], prefetch=10) as consumer:
        name = consumer.name  # type: ignore[attr-defined]
        receiving = asyncio.ensure_future(receive(consumer))
        await asyncio.sleep(0.3)
        # When the server kills its connection, and then messages arrive
        caplog.set_level(logging.INFO, logger="aqueue.broker.redis")
        assert await kill_client(raw, name) == 4  # its connections waiting on the lists of its queue
        await broker.publish([Envelope(f"m{i}", "q", b"[[], {}, {}]", JSON) for i in range(3)])
        # Then it reconnects and receives them
        got: set[str] = set()
        for _ in range(3):
            delivery = await receiving if not got else await receive(consumer)
            got.add(delivery.id)
            await delivery.ack()
    assert got == {"m0", "m1", "m2"}
    warnings = [r for r in caplog.records if r.name == "aqueue.broker.redis" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reconnecting" in warnings[0].getMessage()


@pytest.mark.slow
async def test_an_ack_that_fails_in_an_outage_is_sent_again_and_never_runs_twice(
    private_redis: RedisServer,
) -> None:
    # Given a held message, on a private Redis
    url = f"{private_redis.url}/0"
    async with KombuRedisBroker(url, claim_timeout=3.0, socket_timeout=0.5) as broker:
        await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])
        async with broker.consume(["q"], prefetch=1) as consumer, broker.consume(["q"], prefetch=1) as other:
            delivery = await receive(consumer)
            # When its ack fails, because Redis takes no writes for a second
            admin = aioredis.Redis.from_url(url)
            try:
                await admin.client_pause(1000, all=False)  # writes only
                with pytest.raises(OperationalError, match="ack failed"):
                    await delivery.ack()
                # Then no other consumer gets it (it is still held, and renewed)
                await nothing_for(other, 4.0)
                # And the next fetch sends the ack again: nothing is left held
                await nothing_for(consumer, 0.5)
                assert await admin.hlen("unacked") == 0
                assert await admin.llen("q") == 0
            finally:
                await admin.aclose()


async def test_an_idle_consumer_is_woken_by_any_of_its_lists(broker: KombuRedisBroker) -> None:
    # Given a consumer of two queues, idle
    async with broker.consume(["q", "r"], prefetch=1) as consumer:
        await nothing_for(consumer, 0.3)
        for queue, priority in (("r", 0), ("q", 9), ("r", 6)):
            # When a message arrives on any list of either queue
            receiving = asyncio.ensure_future(receive(consumer))
            await asyncio.sleep(0.2)
            sent = time.monotonic()
            await broker.publish(
                [Envelope(f"{queue}{priority}", queue, b"[[], {}, {}]", JSON, priority=priority)]
            )
            delivery = await receiving
            # Then it is taken at once, not at the end of a poll interval
            assert delivery.id == f"{queue}{priority}" and time.monotonic() - sent < 0.25
            await delivery.ack()


async def test_a_late_ack_of_a_stalled_worker_leaves_the_next_holders_hold(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str
) -> None:
    # Given a consumer that took a message and stalled past its claim (it stopped renewing)
    await broker.publish([Envelope("m1", "q", b"[[], {}, {}]", JSON)])
    async with broker.consume(["q"], prefetch=1) as stalled, broker.consume(["q"], prefetch=1) as other:
        first = await receive(stalled)
        stalled._renewer.cancel()  # type: ignore[attr-defined]
        # When another consumer takes it again, and then the stalled one acknowledges it
        again = await receive(other, timeout=10)
        assert (again.id, again.redelivered) == ("m1", True)
        await first.ack()
        # Then the second hold is still there, until its own ack
        assert await raw.hexists(f"{prefix}unacked", again.tag)
        await again.ack()
    assert await raw.hlen(f"{prefix}unacked") == 0


@pytest.mark.slow
async def test_a_message_whose_holders_keep_vanishing_is_dead_lettered(
    make_broker: Factory, raw: aioredis.Redis, prefix: str
) -> None:
    # Given at most two deliveries, and a message that two consumers took and died holding
    broker = await make_broker(claim_timeout=0.5, max_deliveries=2)
    await broker.publish([Envelope("poison", "q", b"[[], {}, {}]", JSON)])
    for _ in range(2):
        dying = broker.consume(["q"], prefetch=1)
        delivery = await receive(dying, timeout=10)
        await dying._shutdown()  # type: ignore[attr-defined]
    assert delivery.redelivered
    # When another consumer looks for work once the claim ran out
    async with broker.consume(["q"], prefetch=1) as consumer:
        await nothing_for(consumer, 2.0)
    # Then the message is a dead letter, counted, and nothing holds it
    [dead] = await broker.dead_letters("q")
    assert dead.id == "poison"
    [item] = await raw.lrange(f"{prefix}q.dead", 0, -1)
    assert json.loads(item)["properties"]["x-aqueue-restores"] == 2
    assert await raw.hlen(f"{prefix}unacked") == 0


@pytest.mark.slow
async def test_a_message_waiting_for_its_eta_is_renewed_and_handed_out_when_due(
    broker: KombuRedisBroker,
) -> None:
    # Given a message due in 2.5 s (past two claim timeouts), taken by one of two consumers
    due = time.time() + 2.5
    await broker.publish([Envelope("later", "q", b"[[], {}, {}]", JSON, eta=due)])
    async with broker.consume(["q"], prefetch=1) as holder, broker.consume(["q"], prefetch=1) as other:
        receiving = asyncio.ensure_future(receive(holder, timeout=10))
        await asyncio.sleep(0.3)
        # Then the other never gets it, and the holder hands it out once due, not before
        await nothing_for(other, 2.7)
        delivery = await receiving
        assert delivery.id == "later" and not delivery.redelivered and time.time() >= due
        await delivery.ack()


async def test_a_queue_kept_as_a_stream_is_named_in_the_error(
    broker: KombuRedisBroker, raw: aioredis.Redis, prefix: str
) -> None:
    # Given a queue that aqueue's Streams layout keeps on the same prefix
    await raw.xadd(f"{prefix}q", {"body": "x"})
    # When a consumer in kombu's layout takes from it, then the error says what is wrong
    async with broker.consume(["q"], prefetch=1) as consumer:
        with pytest.raises(OperationalError, match=r"is not a list.*Streams layout"):
            await receive(consumer)


@pytest.mark.slow
async def test_cancelled_receives_lose_nothing_and_repeat_nothing(broker: KombuRedisBroker) -> None:
    # Given 30 messages, and a consumer whose receives are cancelled at all sorts of moments
    sent = [f"m{i}" for i in range(30)]
    await broker.publish([Envelope(i, "q", b"[[], {}, {}]", JSON) for i in sent])
    got: list[str] = []
    async with broker.consume(["q"], prefetch=5) as consumer:
        for i in range(60):
            receiving = asyncio.ensure_future(consumer.receive())
            await asyncio.sleep(0.0003 * (i % 7))
            receiving.cancel()
            try:
                delivery = await receiving
            except asyncio.CancelledError:
                continue
            got.append(delivery.id)
            await delivery.ack()
        # Then every message still comes, once
        while len(got) < len(sent):
            delivery = await receive(consumer)
            got.append(delivery.id)
            await delivery.ack()
        await nothing_for(consumer, 0.3)
    assert sorted(got) == sorted(sent)


async def test_closing_stops_parts_that_lose_a_cancellation(broker: KombuRedisBroker) -> None:
    # Given a consumer whose renewer and list waiter each swallow their first cancellation
    async with broker.consume(["q"], prefetch=1) as consumer:
        (renewer, renewer_swallowed), (waiter, waiter_swallowed) = stubborn_task(), stubborn_task()
        consumer._renewer = renewer  # type: ignore[attr-defined]
        consumer._waiters["q"] = waiter  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        started = time.monotonic()
    # When it closed, then both were stopped all the same, at once
    assert time.monotonic() - started < 5
    assert renewer_swallowed.is_set() and waiter_swallowed.is_set()
    assert renewer.cancelled() and waiter.cancelled()
