"""What the SQLite broker does beyond the contract: many processes on one file, visibility timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from aqueue.broker import Consumer, Delivery, from_url
from aqueue.broker.sqlite import SQLiteBroker, _SQLiteConsumer
from aqueue.exceptions import ImproperlyConfigured
from aqueue.message import Envelope

ROOT = Path(__file__).resolve().parents[2]
JSON = "application/json"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/broker.db"


def envelope(queue: str = "q", body: bytes = b"{}", priority: int | None = None) -> Envelope:
    return Envelope(uuid.uuid4().hex, queue, body, JSON, priority=priority)


async def receive(consumer: Consumer, timeout: float = 5.0) -> Delivery:
    with anyio.fail_after(timeout):
        return await consumer.receive()


async def assert_nothing(consumer: Consumer, wait: float) -> None:
    with anyio.move_on_after(wait):
        delivery = await consumer.receive()
        pytest.fail(f"unexpected {delivery!r}")


async def test_two_brokers_on_one_file_never_share_a_message(url: str) -> None:
    # Given 200 messages and two brokers on one file, each with its own connection like two processes
    sent = [envelope() for _ in range(200)]
    got: list[str] = []
    async with SQLiteBroker(url) as first, SQLiteBroker(url) as second:
        await first.publish(sent)

        async def drain(broker: SQLiteBroker) -> None:
            async with broker.consume(["q"], prefetch=8) as consumer:
                while len(got) < len(sent):
                    delivery: Delivery | None = None
                    with anyio.move_on_after(0.5):
                        delivery = await consumer.receive()
                    if delivery is not None:
                        got.append(delivery.id)
                        await delivery.ack()

        # When both consume at once
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, first)
                tg.start_soon(drain, second)
    # Then every message was delivered exactly once
    assert sorted(got) == sorted(e.id for e in sent)


async def test_unrenewed_claim_lapses_and_is_redelivered(url: str) -> None:
    # Given a message held by a consumer whose process then dies (broker closed without settling)
    async with SQLiteBroker(url) as publisher:
        sent = envelope()
        await publisher.publish([sent])
    dying = SQLiteBroker(url, visibility_timeout=0.3)
    taken = await receive(dying.consume(["q"], prefetch=1))
    taken_at = time.monotonic()
    await dying.aclose()
    # When another consumer waits past the visibility timeout
    async with (
        SQLiteBroker(url, visibility_timeout=0.3) as survivor,
        survivor.consume(["q"], prefetch=1) as consumer,
    ):
        again = await receive(consumer)
        # Then it gets the message again, flagged as redelivered, once the timeout has passed
        assert (again.id, again.redelivered, taken.redelivered) == (sent.id, True, False)
        assert time.monotonic() - taken_at >= 0.25
        await again.ack()


async def test_renewed_claim_is_not_redelivered(url: str) -> None:
    # Given a live consumer holding a message longer than the visibility timeout
    async with SQLiteBroker(url, visibility_timeout=0.3) as live, SQLiteBroker(url) as other:
        await live.publish([envelope()])
        async with live.consume(["q"], prefetch=1) as holder, other.consume(["q"], prefetch=1) as rival:
            held = await receive(holder)
            # When another consumer waits for three timeouts
            # Then it gets nothing, because the live consumer keeps renewing its claim
            await assert_nothing(rival, 1.0)
            await held.ack()
            await assert_nothing(rival, 0.5)


async def test_settling_a_lapsed_claim_does_not_touch_the_new_one(url: str) -> None:
    # Given a delivery whose claim lapsed (renewal stopped) and that another consumer then received
    async with SQLiteBroker(url, visibility_timeout=0.3) as broker:
        await broker.publish([envelope()])
        stale_consumer = broker.consume(["q"], prefetch=1)
        stale = await receive(stale_consumer)
        assert isinstance(stale_consumer, _SQLiteConsumer) and stale_consumer._renewal is not None
        stale_consumer._renewal.cancel()
        async with broker.consume(["q"], prefetch=1) as consumer:
            current = await receive(consumer)
            # When the first holder acknowledges late
            await stale.ack()
            # Then the message is still there for the current holder to settle
            await current.requeue()
            again = await receive(consumer)
            assert again.id == current.id == stale.id
            await again.ack()


async def test_rejected_message_is_dead_lettered(url: str) -> None:
    # Given a message received and rejected
    async with SQLiteBroker(url) as broker:
        sent = envelope(body=b'{"task": "nope"}', priority=3)
        await broker.publish([sent])
        async with broker.consume(["q"], prefetch=1) as consumer:
            await (await receive(consumer)).reject()
        # Then it is kept as a dead letter with its body and content type
        assert await broker.dead_letters("q") == [sent]
        assert await broker.dead_letters("other") == []
        assert await broker.purge("q") == 0


async def test_higher_priority_first_then_oldest_first(url: str) -> None:
    # Given messages of several priorities
    async with SQLiteBroker(url) as broker:
        low, high, plain = envelope(priority=1), envelope(priority=9), envelope()
        high_later = envelope(priority=9)
        await broker.publish([low, high, plain, high_later])
        # When they are consumed
        async with broker.consume(["q"], prefetch=1) as consumer:
            order = []
            for _ in range(4):
                delivery = await receive(consumer)
                order.append(delivery.id)
                await delivery.ack()
    # Then higher priority comes first, and equal priorities in publish order
    assert order == [high.id, high_later.id, low.id, plain.id]


async def test_purge_leaves_claimed_messages(url: str) -> None:
    # Given one message held by a consumer and two waiting
    async with SQLiteBroker(url) as broker:
        await broker.publish([envelope()])
        async with broker.consume(["q"], prefetch=1) as consumer:
            held = await receive(consumer)
            await broker.publish([envelope(), envelope()])
            # When the queue is purged, then only the waiting ones are deleted
            assert await broker.purge("q") == 2
            await held.ack()


async def test_cancelled_receive_gives_the_message_back_at_once(url: str) -> None:
    # Given a receive cancelled while its claim waits, on the connection's thread, for the file's lock
    async with SQLiteBroker(url, visibility_timeout=30) as broker:
        sent = envelope()
        await broker.publish([sent])
        consumer = broker.consume(["q"], prefetch=1)
        with closing(sqlite3.connect(broker.path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            task = asyncio.create_task(consumer.receive())
            await asyncio.sleep(0.2)
            task.cancel()
            other.execute("COMMIT")
        with pytest.raises(asyncio.CancelledError):
            await task
        # When another consumer receives, then it gets the message well before the visibility timeout
        async with broker.consume(["q"], prefetch=1) as other:
            delivery = await receive(other, timeout=2)
            assert (delivery.id, delivery.redelivered) == (sent.id, False)
            await delivery.ack()
        await consumer.aclose()


async def test_relative_url_is_under_the_working_directory(tmp_cwd: Path) -> None:
    # Given a relative URL whose folder does not exist yet, then connecting creates it there
    async with SQLiteBroker("sqlite:///var/queue.db"):
        pass
    assert (tmp_cwd / "var" / "queue.db").is_file()


async def test_absolute_url(tmp_path: Path) -> None:
    # Given an absolute URL (four slashes), then connecting creates that file
    path = tmp_path / "abs" / "queue.db"
    async with SQLiteBroker(f"sqlite:////{str(path).lstrip('/')}") as broker:
        assert broker.path == path
    assert path.is_file()


def test_transport_options_are_checked(url: str) -> None:
    # Given broker_transport_options, then known ones are used and a misspelt one names the right one
    broker = from_url(url, {"visibility_timeout": 5})
    assert isinstance(broker, SQLiteBroker) and broker.visibility_timeout == 5
    with pytest.raises(ImproperlyConfigured, match="'visibility_timeout'"):
        from_url(url, {"visibility_timout": 5})
    with pytest.raises(ImproperlyConfigured, match="> 0"):
        SQLiteBroker(url, polling_interval=0)


async def test_another_process_publishes_while_this_one_consumes(url: str) -> None:
    # Given a consumer in this process
    script = """
        import asyncio, sys
        from aqueue.broker.sqlite import SQLiteBroker, _SQLiteConsumer
        from aqueue.message import Envelope

        async def main():
            async with SQLiteBroker(sys.argv[1]) as broker:
                for i in range(20):
                    await broker.publish([Envelope(f"m{i}", "q", str(i).encode(), "application/json")])

        asyncio.run(main())
    """
    got: list[str] = []
    # When another process publishes twenty messages into the same file
    async with (
        SQLiteBroker(url) as broker,
        broker.consume(["q"], prefetch=4) as consumer,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(run_python, script, url)
        with anyio.fail_after(20):
            while len(got) < 20:
                delivery = await consumer.receive()
                got.append(delivery.id)
                await delivery.ack()
    # Then this process receives all of them, in order
    assert got == [f"m{i}" for i in range(20)]


async def test_killed_process_messages_come_back_after_the_timeout(url: str) -> None:
    # Given another process that took a message and is then killed with SIGKILL
    script = """
        import asyncio, sys
        from aqueue.broker.sqlite import SQLiteBroker, _SQLiteConsumer

        async def main():
            broker = SQLiteBroker(sys.argv[1], visibility_timeout=0.5)
            delivery = await broker.consume(["q"], prefetch=1).receive()
            print(delivery.id, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """
    async with SQLiteBroker(url, visibility_timeout=0.5) as broker:
        sent = envelope()
        await broker.publish([sent])
        async with await anyio.open_process(python_command(script, url), env=python_env()) as process:
            assert process.stdout is not None
            with anyio.fail_after(20):
                line = await process.stdout.receive()
            assert line.decode().strip() == sent.id
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
        # When this process consumes, then it gets the message again, flagged as redelivered
        async with broker.consume(["q"], prefetch=1) as consumer:
            delivery = await receive(consumer)
            assert (delivery.id, delivery.redelivered) == (sent.id, True)
            await delivery.ack()


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script), *args]


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def run_python(script: str, *args: str) -> None:
    with anyio.fail_after(20):
        await anyio.run_process(python_command(script, *args), env=python_env(), stderr=subprocess.STDOUT)


async def napping(broker: SQLiteBroker) -> None:
    """Wait until a consumer of ``broker`` found nothing and sleeps."""
    with anyio.fail_after(10):
        while not broker._waiters:
            await asyncio.sleep(0.01)


async def test_a_consumer_is_woken_by_a_publish_in_another_process(url: str) -> None:
    # Given a consumer here that would poll only once an hour, asleep on an empty queue
    script = """
        import asyncio, sys
        from aqueue.broker.sqlite import SQLiteBroker
        from aqueue.message import Envelope

        async def main():
            async with SQLiteBroker(sys.argv[1]) as broker:
                await broker.publish([Envelope("m1", "q", b"{}", "application/json")])

        asyncio.run(main())
    """
    async with SQLiteBroker(url, polling_interval=3600) as broker, broker.consume(["q"], 1) as consumer:
        task = asyncio.create_task(receive(consumer, timeout=20))
        await napping(broker)
        # When another process publishes
        await run_python(script, url)
        # Then the consumer wakes and receives the message (an hour before its next poll)
        delivery = await task
        assert delivery.id == "m1" and broker._listener.received >= 1
        await delivery.ack()


async def test_a_missed_wake_up_is_made_up_by_the_poll(url: str) -> None:
    # Given a consumer asleep on an empty queue, polling every 0.2 s
    async with SQLiteBroker(url, polling_interval=0.2) as broker, broker.consume(["q"], 1) as consumer:
        task = asyncio.create_task(receive(consumer, timeout=20))
        await napping(broker)
        # When a row arrives with no wake-up (as from a publisher killed between commit and wake-up)
        with closing(sqlite3.connect(broker.path, isolation_level=None)) as other:
            other.execute(
                "INSERT INTO aqueue_messages (msg_id, queue, body, content_type, priority, visible_at) "
                "VALUES ('m1', 'q', x'7b7d', ?, 0, 0)",
                (JSON,),
            )
        # Then the poll finds it, without a wake-up
        delivery = await task
        assert (delivery.id, broker._listener.received) == ("m1", 0)
        await delivery.ack()


async def test_an_eta_message_is_delivered_when_due_without_polling(url: str) -> None:
    # Given a consumer that would poll only once an hour, asleep on an empty queue
    async with (
        SQLiteBroker(url, polling_interval=3600) as broker,
        SQLiteBroker(url) as publisher,
        broker.consume(["q"], 1) as consumer,
    ):
        task = asyncio.create_task(receive(consumer, timeout=20))
        await napping(broker)
        # When another holder of the file publishes a message due in 0.3 s
        due = Envelope(uuid.uuid4().hex, "q", b"{}", JSON, eta=time.time() + 0.3)
        await publisher.publish([due])
        # Then the consumer receives it once it is due, not an hour later
        delivery = await task
        assert due.eta is not None and delivery.id == due.id and time.time() >= due.eta
        await delivery.ack()


async def test_a_killed_consumers_socket_does_not_get_in_the_way(url: str) -> None:
    # Given a consumer process killed with SIGKILL while it waited, leaving its wake-up socket behind
    script = """
        import asyncio, sys
        from aqueue.broker.sqlite import SQLiteBroker

        async def main():
            broker = SQLiteBroker(sys.argv[1])
            consumer = broker.consume(["q"], prefetch=1)
            task = asyncio.create_task(consumer.receive())
            while not broker._waiters:
                await asyncio.sleep(0.01)
            print("waiting", flush=True)
            await task

        asyncio.run(main())
    """
    async with SQLiteBroker(url, polling_interval=3600) as broker, broker.consume(["q"], 1) as consumer:
        async with await anyio.open_process(python_command(script, url), env=python_env()) as process:
            assert process.stdout is not None
            with anyio.fail_after(20):
                assert (await process.stdout.receive()).strip() == b"waiting"
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
        folder = broker.path.with_name(broker.path.name + "-wake")
        assert len(os.listdir(folder)) == 1
        task = asyncio.create_task(receive(consumer, timeout=20))
        await napping(broker)
        # When another holder of the file publishes
        async with SQLiteBroker(url) as publisher:
            await publisher.publish([sent := envelope()])
            # Then the live consumer is woken all the same, and the dead socket is gone
            delivery = await task
            assert delivery.id == sent.id
            assert os.listdir(folder) == [broker._listener._name]
        await delivery.ack()
