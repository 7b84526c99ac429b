"""Faults and bad input on real servers: poison entries, fields of the wrong type, acks lost in an outage,
result backend outages, publishes whose reply or confirm was lost. No crash, no stall, no second run, no
lost result.

Tests that stop or pause Redis do it to a private ``redis-server``; the ones that cut connections do it in a
loopback proxy of their own, so the shared servers are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqueue import App
from aqueue.broker.redis import RedisBroker
from aqueue.message import Envelope, Message, encode_message
from aqueue.serialization import get_serializer
from aqueue.worker import Worker
from tests.conftest import REDIS_TEST_DB, REDIS_URL, RedisServer, Transport, require_server, transport_for

MakeApp = Callable[..., App]
JSON = get_serializer("json")


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the tests' database of the shared Redis."""
    require_server("redis")
    client = aioredis.Redis.from_url(f"{REDIS_URL}/{REDIS_TEST_DB}")
    yield client
    await client.aclose()


@pytest.fixture
async def redis_transport(tmp_path: Path, unique: str) -> AsyncIterator[Transport]:
    async with transport_for("redis", tmp_path, unique) as transport:
        yield transport


def entry(task_id: bytes, body: bytes, content_type: bytes = b"application/json") -> list[bytes]:
    """A stream entry's fields as the Redis broker writes them."""
    return [b"body", body, b"content_type", content_type, b"id", task_id, b"priority", b""]


async def xadd(raw: aioredis.Redis, stream: str, fields: list[bytes]) -> bytes:
    """Add an entry with exactly these fields, in this order."""
    added = await raw.xadd(stream, dict(zip(fields[::2], fields[1::2], strict=True)))
    assert isinstance(added, bytes)
    return added


def stream_of(app: App) -> str:
    assert isinstance(app.broker, RedisBroker)
    return app.broker.stream_key(app.conf.task_default_queue)


class Proxy:
    """A loopback TCP proxy to ``127.0.0.1:port`` that can lose the next reply or cut the next request."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, 0
        self._server: asyncio.Server | None = None
        self._lose_reply = self._cut_request = False
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def lose_next_reply(self) -> None:
        """Drop the next bytes the server sends, and close both connections."""
        self._lose_reply = True

    def cut_next_request(self) -> None:
        """Forward the next bytes the client sends but for their last three, and close both connections."""
        self._cut_request = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream}
        pumps = [
            asyncio.create_task(self._pump(reader, upstream, request=True)),
            asyncio.create_task(self._pump(upstream_reader, writer, request=False)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for side in (writer, upstream):
            side.close()
            self._writers.discard(side)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bool) -> None:
        while data := await reader.read(65536):
            if request and self._cut_request:
                self._cut_request = False
                writer.write(data[:-3])
                await writer.drain()
                return
            if not request and self._lose_reply:
                self._lose_reply = False
                return
            writer.write(data)
            await writer.drain()


# 1. Redis entries whose fields cannot be read ----------------------------------------------------------


async def test_redis_entries_with_unreadable_fields_are_dead_lettered_and_the_worker_goes_on(
    redis_transport: Transport, make_app: MakeApp, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given entries that no delivery can be made of, among good tasks
    app = make_app(redis_transport)

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    good = encode_message(Message("good-body", "tasks.add", [1, 2]), JSON)
    poison = [
        entry(b"\xff\xfe", b"{}"),  # an id that is not UTF-8
        entry(b"ctype", good, b"application/\xff"),  # a content type that is not UTF-8
        [b"content_type", b"application/json", b"id", b"no-body"],
        [b"body", good, b"id", b"no-content-type"],
        [b"something", b"else"],
        [*entry(b"\xc3\x28", good), b"redelivered", b"1"],
    ]
    async with app:
        stream = stream_of(app)
        ids = [await xadd(raw, stream, fields) for fields in poison]
        results = [add.delay(i, i) for i in range(10)]
        async with Worker(app, concurrency=2) as worker:
            # Then every good task runs, and each poison entry is moved to the dead-letter stream
            assert [await r.get(timeout=10) for r in results] == [2 * i for i in range(10)]
            dead = f"{stream}.dead"
            await until(lambda: _equals(raw.xlen(dead), len(poison)))
            assert worker.failure is None
    # And each is logged once, by its stream id, saying why
    for entry_id in ids:
        logged = [r for r in caplog.records if entry_id.decode() in r.getMessage()]
        assert len(logged) == 1, entry_id
        assert "It was not run and has been dead-lettered" in logged[0].getMessage()
    assert "its id field is not UTF-8" in caplog.text
    assert "it has no body field" in caplog.text


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


# 2. Fields of the wrong type --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "kombu", "amqp"])
async def test_fields_of_the_wrong_type_are_dead_lettered_and_hold_no_prefetch_slot(
    kind: str, tmp_path: Path, unique: str, make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    wrong: list[tuple[str, Any]] = [
        ("expires", "soon"),
        ("eta", "later"),
        ("retries", "1"),
        ("headers", [1]),
        ("timelimit", "10"),
        ("reply_to", 5),
    ]
    async with transport_for(kind, tmp_path, unique) as transport:
        # Given a worker holding at most 4 unacknowledged messages, and 18 bad ones ahead of good tasks
        app = make_app(transport)

        @app.task(name="tasks.add")
        async def add(x: int, y: int) -> int:
            return x + y

        bad = [
            Envelope(
                f"bad-{field}-{i}",
                transport.queue,
                JSON.dumps(_task(f"bad-{field}-{i}", field, value)),
                JSON.content_type,
            )
            for field, value in wrong
            for i in range(3)
        ]
        async with app:
            await app.broker.publish(bad)
            results = [add.delay(i, 1) for i in range(5)]
            async with Worker(app, concurrency=1, prefetch_multiplier=4):
                # Then the good tasks all run, and the bad ones end in the dead letters
                assert [await r.get(timeout=10) for r in results] == [i + 1 for i in range(5)]
                await until(lambda: _dead_count(app, transport.queue, len(bad)))
    # And each was logged with its id and the reason
    for field, _ in wrong:
        assert f"Rejecting undecodable message bad-{field}-0" in caplog.text
        assert f"bad {field!r} field" in caplog.text
    assert "never retrieved" not in caplog.text


def _task(task_id: str, field: str, value: Any) -> dict[str, Any]:
    return {"id": task_id, "task": "tasks.add", "args": [1, 2], field: value}


async def _dead_count(app: App, queue: str, expected: int) -> bool:
    return len(await app.broker.dead_letters(queue)) == expected


# 3. Acks lost in an outage; copies of tasks running here --------------------------------------------


async def test_a_task_whose_ack_failed_in_an_outage_does_not_run_again(
    private_redis: RedisServer, make_app: MakeApp, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker (acks_late) on a private Redis, its results in the shared one, and a task that
    # pauses the broker's writes as it returns, so that its acknowledgement times out
    require_server("redis")
    caplog.set_level(logging.INFO)
    app = make_app(
        broker=f"{private_redis.url}/0",
        backend=f"{REDIS_URL}/{REDIS_TEST_DB}",
        broker_transport_options={"socket_timeout": 0.5},
        result_backend_transport_options={"global_keyprefix": f"t{unique}:"},
        task_acks_late=True,
    )
    pauser = aioredis.Redis.from_url(private_redis.url)
    runs: list[int] = []

    @app.task(name="tasks.once")
    async def once() -> str:
        runs.append(1)
        if len(runs) == 1:
            await pauser.client_pause(2500, all=False)  # writes only
        return "done"

    try:
        async with app:
            result = await once.delay()
            async with Worker(app):
                # When it runs and its ack fails, then the result is there
                assert await result.get(timeout=10) == "done"
                # And once Redis takes writes again, the message is delivered again and acknowledged
                # without running: the stream ends empty, and the task ran once
                await until(lambda: _equals(pauser.xlen(stream_of(app)), 0), timeout=20)
                await asyncio.sleep(0.3)
    finally:
        await pauser.aclose()
    assert runs == [1]
    assert "could not be acknowledged" in caplog.text
    assert f"Task tasks.once[{result.id}] already finished: redelivered copy acknowledged" in caplog.text


async def test_a_redelivered_copy_of_a_task_running_here_is_acknowledged_when_the_run_ends(
    redis_transport: Transport, make_app: MakeApp, raw: aioredis.Redis
) -> None:
    # Given a task running (acks_late) in a worker
    app = make_app(redis_transport, task_acks_late=True)
    runs: list[int] = []
    started, release = asyncio.Event(), asyncio.Event()

    @app.task(name="tasks.slow")
    async def slow() -> str:
        runs.append(1)
        started.set()
        await release.wait()
        return "done"

    fields = entry(b"dup-1", encode_message(Message("dup-1", "tasks.slow"), JSON))
    async with app, Worker(app, concurrency=4):
        stream = stream_of(app)
        await xadd(raw, stream, fields)
        await asyncio.wait_for(started.wait(), 5)
        # When a redelivered copy of it arrives
        await xadd(raw, stream, [*fields, b"redelivered", b"1"])
        await until(lambda: _equals(_pending(raw, stream), 2))
        await asyncio.sleep(0.2)
        # Then it does not run, and is held until the run has ended, then acknowledged
        assert runs == [1]
        assert await _pending(raw, stream) == 2
        release.set()
        assert await app.AsyncResult("dup-1").get(timeout=5) == "done"
        await until(lambda: _equals(raw.xlen(stream), 0))
    assert runs == [1]


async def _pending(raw: aioredis.Redis, stream: str) -> int:
    return int((await raw.xpending(stream, "aqueue"))["pending"])


# 4. Result backend outages ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "kombu", "amqp"])
async def test_results_of_tasks_done_while_the_backend_restarts_are_not_lost(
    kind: str,
    private_redis: RedisServer,
    tmp_path: Path,
    unique: str,
    make_app: MakeApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with transport_for(kind, tmp_path, unique) as transport:
        # Given a worker (acks_late) whose result backend is a private Redis
        app = make_app(
            transport,
            backend=f"{private_redis.url}/0",
            result_backend_transport_options={"socket_timeout": 1.0},
            task_acks_late=True,
        )

        @app.task(name="tasks.add")
        async def add(x: int, y: int) -> int:
            return x + y

        async with app, Worker(app, concurrency=4):
            assert await add.delay(1, 1).get(timeout=10) == 2
            # When the backend goes down while tasks finish, and comes back 1.5 s later
            await private_redis.stop()
            results = [await add.delay(i, i) for i in range(10)]
            await until(lambda: "Cannot store the SUCCESS state" in caplog.text)
            await asyncio.sleep(1.5)
            await private_redis.start()
            # Then every result is there
            assert [await r.get(timeout=20) for r in results] == [2 * i for i in range(10)]
    assert "retrying for up to 20s" in caplog.text
    assert "the result backend is back" in caplog.text


async def test_an_acks_late_message_whose_result_cannot_be_stored_is_not_acknowledged(
    private_redis: RedisServer,
    redis_transport: Transport,
    make_app: MakeApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a worker (acks_late) that tries to store a result for 0.3 s, and its result backend down
    app = make_app(redis_transport, backend=f"{private_redis.url}/0", task_acks_late=True)
    runs: list[int] = []

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        runs.append(x)
        return x + y

    async with app, Worker(app, concurrency=1) as worker:
        assert worker._loop is not None
        worker._loop.executor.store_retry_for = 0.3
        await private_redis.stop()
        # When a task runs and its result cannot be stored
        result = await add.delay(2, 2)
        await until(lambda: "Cannot store the SUCCESS state" in caplog.text)
        await asyncio.sleep(1.0)
        # Then the message came back: once the backend is back, the task runs again and its result is stored
        await private_redis.start()
        assert await result.get(timeout=20) == 4
    assert len(runs) >= 2
    assert "the message is not acknowledged: it goes back to the queue" in caplog.text


# 5. Publishes whose reply or confirm was lost ---------------------------------------------------------


async def test_a_redis_publish_whose_reply_was_lost_is_stored_once(
    redis_transport: Transport, raw: aioredis.Redis
) -> None:
    async with Proxy(6379) as proxy:
        broker = RedisBroker(
            f"redis://127.0.0.1:{proxy.port}/{REDIS_TEST_DB}", global_keyprefix=redis_transport.prefix
        )
        try:
            await broker.connect()
            # When the reply to a publish is lost after Redis stored it
            proxy.lose_next_reply()
            sent = [Envelope(f"m{i}", redis_transport.queue, b"{}", JSON.content_type) for i in range(3)]
            await broker.publish(sent)
            # Then the messages are in the stream once
            assert await raw.xlen(broker.stream_key(redis_transport.queue)) == 3
        finally:
            await broker.aclose()


def worker_and_client(
    make_app: MakeApp, transport: Transport, client_broker: str
) -> tuple[App, App, Counter[int]]:
    """A worker's app and a client's app on ``client_broker``, and how often ``tasks.record(n)`` ran for each n."""
    worker_app, client = make_app(transport), make_app(transport, broker=client_broker)
    runs: Counter[int] = Counter()

    @worker_app.task(name="tasks.record")
    async def record(n: int) -> int:
        runs[n] += 1
        return n

    return worker_app, client, runs


async def test_tasks_whose_redis_publish_was_cut_short_run_once(
    redis_transport: Transport, make_app: MakeApp, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with Proxy(6379) as proxy:
        # Given a client publishing through a proxy, and a worker on the same queue
        proxied = f"redis://127.0.0.1:{proxy.port}/{REDIS_TEST_DB}"
        worker_app, client, runs = worker_and_client(make_app, redis_transport, proxied)
        async with client, worker_app:
            # When the connection is cut as a batch is written, so that some of it may have been stored
            proxy.cut_next_request()
            sent = [client.send_task("tasks.record", args=[n]) for n in range(5)]
            await asyncio.gather(*sent)
            async with Worker(worker_app):
                # Then every task runs once
                assert [await worker_app.AsyncResult(r.id).get(timeout=10) for r in sent] == list(range(5))
                await until(lambda: _equals(raw.xlen(stream_of(worker_app)), 0))
                await asyncio.sleep(0.3)
    assert runs == dict.fromkeys(range(5), 1)
    assert "Publish failed" in caplog.text
    assert "redelivered copy" in caplog.text


async def test_a_task_whose_amqp_publish_confirm_was_lost_runs_once(
    tmp_path: Path, unique: str, make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    require_server("redis")
    caplog.set_level(logging.INFO)
    async with Proxy(5672) as proxy, transport_for("amqp", tmp_path, unique) as transport:
        # Given a client publishing through a proxy, a worker, and results in Redis
        transport.backend_url = f"{REDIS_URL}/{transport.redis_db}"
        transport.backend_options = {"global_keyprefix": transport.prefix}
        proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        worker_app, client, runs = worker_and_client(make_app, transport, proxied)
        async with client, worker_app:
            await client.send_task("tasks.record", args=[0])
            # When RabbitMQ's confirm of a publish is lost with the connection
            proxy.lose_next_reply()
            result = await asyncio.wait_for(client.send_task("tasks.record", args=[1]), 20)
            async with Worker(worker_app):
                # Then the task runs once, though it was published twice
                assert await worker_app.AsyncResult(result.id).get(timeout=10) == 1
                await until(lambda: "redelivered copy" in caplog.text or runs[1] > 1)
                await asyncio.sleep(0.3)
    assert runs == {0: 1, 1: 1}
    assert "Publish failed" in caplog.text
