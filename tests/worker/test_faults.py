"""Faults and bad input on real servers: entries and messages no worker can use must not crash it or
stall it.
"""

from __future__ import annotations

import asyncio
import time
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
from tests.conftest import REDIS_TEST_DB, REDIS_URL, Transport, require_server, transport_for

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


@pytest.mark.parametrize("kind", ["redis", "amqp"])
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
