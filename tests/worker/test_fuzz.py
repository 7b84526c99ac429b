"""Fuzz: a thousand random or mutated messages published raw among good tasks, on Redis (both layouts),
RabbitMQ and SQLite. The worker stays up, every good task completes, and no message stays unsettled.

The bad messages: random bytes; random JSON; a valid task message with one field replaced by a value of
another type, removed, or made invalid UTF-8; truncated JSON; msgpack with bytes where text belongs; a
good body under a content type that is garbage. On Redis the stream entry's own fields are fuzzed too
(ids and content types that are not UTF-8, missing or extra fields), and in kombu's layout the
envelope (fields missing or of another type, bodies that are not base64, Celery headers of another type);
on RabbitMQ the properties (content
type, message id, headers, also not UTF-8). The seed is random and printed with any failure; set
``AQUEUE_FUZZ_SEED`` to replay one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiormq
import msgpack
import pytest
import redis.asyncio as aioredis

from aqueue import App
from aqueue.broker.amqp import AMQPBroker
from aqueue.broker.amqp_consumer import ETA_HEADER, RESENT_HEADER
from aqueue.broker.amqp_wire import Outbox, encode_properties
from aqueue.broker.redis import RedisBroker
from aqueue.broker.redis_kombu import KombuRedisBroker
from aqueue.message import Envelope
from aqueue.serialization import get_serializer
from aqueue.worker import Worker
from tests.conftest import Transport, transport_for

MakeApp = Callable[..., App]
JSON = get_serializer("json")
BAD, GOOD, ROUNDS = 1000, 100, 10
SEED = int(os.environ.get("AQUEUE_FUZZ_SEED", random.randrange(2**32)))

WRONG: list[Any] = ["", "x", "é" * 80, 0, -1, 1.5, 10**30, True, False, None, [], [1, "a"], {}, {"a": [None]}]
INVALID_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"abc\x80"]
FIELDS = ["id", "task", "args", "kwargs", "retries", "eta", "expires", "ignore_result", "reply_to", "headers"]
FIELDS += ["timelimit"]


def valid(n: int) -> dict[str, Any]:
    """A task message with every field a worker reads set to a value of the right type."""
    return {
        "id": f"fuzz-{n}",
        "task": "tasks.add",
        "args": [1, 2],
        "kwargs": {},
        "retries": 0,
        "eta": None,
        "expires": None,
        "ignore_result": False,
        "reply_to": None,
        "headers": {"h": 1},
        "timelimit": [None, None],
    }


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(WRONG)
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return rng.random() * 10 ** rng.randint(-5, 20)
    if kind == 3:
        return "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 20)))
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(random_json(rng, 3)): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def bad_body(rng: random.Random, n: int) -> tuple[bytes, str]:
    """A body and content type that are not a good task message (some still happen to run)."""
    message, field = valid(n), rng.choice(FIELDS)
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 300)), JSON.content_type
    if kind == 1:
        return JSON.dumps(random_json(rng)), JSON.content_type
    if kind == 2:
        message[field] = rng.choice(WRONG) if rng.random() < 0.7 else random_json(rng)
        return JSON.dumps(message), JSON.content_type
    if kind == 3:
        message[field] = "@@@"
        return JSON.dumps(message).replace(
            b'"@@@"', b'"' + rng.choice(INVALID_UTF8) + b'"'
        ), JSON.content_type
    if kind == 4:
        del message[field]
        return JSON.dumps(message), JSON.content_type
    if kind == 5:
        text = JSON.dumps(message)
        return text[: rng.randrange(len(text))], JSON.content_type
    if kind == 6:
        message[field] = rng.choice([rng.choice(INVALID_UTF8), b"", 2**63, -(2**63), [b"x"]])
        return msgpack.packb(message, use_bin_type=True), "application/x-msgpack"
    garbage = ["", "text/plain", "application/jsonx", "é", "application/json; charset=x" * 3]
    return JSON.dumps(message), rng.choice(garbage)


class Fuzz:
    """One broker's raw publishing of bad messages, and its check that nothing is left unsettled."""

    def __init__(self, app: App, transport: Transport, rng: random.Random) -> None:
        self.app, self.transport, self.rng, self.queue = app, transport, rng, transport.queue

    async def publish_bad(self, first: int, count: int) -> None:
        await self.app.broker.publish(
            [
                Envelope(str(random_json(self.rng)), self.queue, *bad_body(self.rng, n))
                for n in range(first, first + count)
            ]
        )

    async def settled(self) -> bool:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class RedisFuzz(Fuzz):
    def __init__(self, app: App, transport: Transport, rng: random.Random) -> None:
        super().__init__(app, transport, rng)
        assert isinstance(app.broker, RedisBroker)
        self.stream = app.broker.stream_key(self.queue)
        self.raw = aioredis.Redis.from_url(transport.broker_url)

    def fields(self, n: int) -> list[bytes]:
        rng = self.rng
        body, content_type = bad_body(rng, n)
        task_id = rng.choice([f"fuzz-{n}".encode(), rng.randbytes(rng.randint(0, 8)), *INVALID_UTF8])
        ctype = rng.choice([content_type.encode(), *INVALID_UTF8])
        fields = [b"body", body, b"content_type", ctype, b"id", task_id, b"priority", rng.randbytes(2)]
        kind = rng.randrange(4)
        if kind == 1:  # another field order, maybe a redelivery mark
            pairs = [fields[i : i + 2] for i in range(0, 8, 2)] + [[b"redelivered", b"1"]] * rng.randint(0, 1)
            rng.shuffle(pairs)
            fields = [value for pair in pairs for value in pair]
        elif kind == 2:  # fields missing
            keep = sorted(rng.sample(range(4), rng.randint(1, 3)))
            fields = [value for i in keep for value in fields[2 * i : 2 * i + 2]]
        elif kind == 3:  # random names and values
            fields = [rng.randbytes(rng.randint(1, 6)) for _ in range(2 * rng.randint(1, 5))]
        return fields

    async def publish_bad(self, first: int, count: int) -> None:
        async with self.raw.pipeline(transaction=False) as pipe:
            for n in range(first, first + count):
                if self.rng.random() < 0.5:
                    pipe.execute_command("XADD", self.stream, "*", *self.fields(n))
                else:
                    body, content_type = bad_body(self.rng, n)
                    fields = [
                        b"body",
                        body,
                        b"content_type",
                        content_type.encode(),
                        b"id",
                        b"x",
                        b"priority",
                        b"",
                    ]
                    pipe.execute_command("XADD", self.stream, "*", *fields)
            await pipe.execute()

    async def settled(self) -> bool:
        return bool(await self.raw.xlen(self.stream) == 0)

    async def aclose(self) -> None:
        await self.raw.aclose()


class AMQPFuzz(Fuzz):
    async def publish_bad(self, first: int, count: int) -> None:
        broker = self.app.broker
        assert isinstance(broker, AMQPBroker)
        channel = await broker.channel()
        try:
            outbox = Outbox(cast(aiormq.Channel, await channel.get_underlay_channel()))
            for n in range(first, first + count):
                body, content_type = bad_body(self.rng, n)
                outbox.publish(self.queue, self.queue, self.properties(content_type), body)
            await outbox.flush()
        finally:
            await channel.close()

    def properties(self, content_type: str) -> bytes:
        rng = self.rng
        kind = rng.randrange(4)
        if kind == 0:  # a content type and a message id that are not UTF-8
            ctype, raw_id = rng.choice(INVALID_UTF8), rng.choice(INVALID_UTF8)
            return b"\x80\x80" + bytes([len(ctype)]) + ctype + bytes([len(raw_id)]) + raw_id
        if kind == 1:  # a header name that is not UTF-8
            key = rng.choice(INVALID_UTF8)
            entry = bytes([len(key)]) + key + b"S\x00\x00\x00\x01x"
            table = len(entry).to_bytes(4, "big") + entry
            return b"\xa0\x00" + bytes([len(content_type.encode())]) + content_type.encode() + table
        headers: dict[str, Any] = {
            str(random_json(rng, 3))[:50]: rng.choice([1, -5, "x", 1.5, True, None, [1, "a"], {"k": 2}])
            for _ in range(rng.randint(0, 3))
        }
        if kind == 2:  # our own headers, with values of the wrong type (an eta in the past at most)
            headers[ETA_HEADER] = rng.choice(["soon", 1.5, -1, True, rng.randrange(int(time.time() * 1000))])
            headers[RESENT_HEADER] = rng.choice(["", 0, "yes"])
        message_id = str(random_json(rng, 3))[:60]
        return encode_properties(content_type=content_type, headers=headers, message_id=message_id)

    async def settled(self) -> bool:
        broker = self.app.broker
        assert isinstance(broker, AMQPBroker)
        channel = await broker.channel()
        try:
            declared = await channel.declare_queue(self.queue, passive=True, robust=False)
            return declared.declaration_result.message_count == 0
        finally:
            await channel.close()


class SQLiteFuzz(Fuzz):
    async def settled(self) -> bool:
        path = self.transport.broker_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            return bool(db.execute("SELECT COUNT(*) FROM aqueue_messages").fetchone()[0] == 0)


class KombuFuzz(Fuzz):
    """Redis in kombu's layout: kombu envelopes with Celery headers, mutated, pushed raw to the lists."""

    def __init__(self, app: App, transport: Transport, rng: random.Random) -> None:
        super().__init__(app, transport, rng)
        assert isinstance(app.broker, KombuRedisBroker)
        self.broker = app.broker
        self.raw = aioredis.Redis.from_url(transport.broker_url)

    def envelope(self, n: int) -> bytes:
        rng = self.rng
        body, content_type = bad_body(rng, n)
        headers: Any = {"task": "tasks.add", "id": f"fuzz-{n}"}
        if rng.random() < 0.5:  # Celery's headers, one of them of another type
            headers[rng.choice(["id", "task", "eta", "expires", "retries", "timelimit", "redelivered"])] = (
                rng.choice(WRONG) if rng.random() < 0.7 else random_json(rng)
            )
        encoded = base64.b64encode(body).decode()
        properties: Any = {"delivery_info": {"exchange": "", "routing_key": self.queue}, "priority": 0}
        properties.update(body_encoding="base64", delivery_tag=f"tag-{n}")
        payload: Any = {"body": encoded, "content-type": content_type, "headers": headers}
        payload["properties"] = properties
        kind = rng.randrange(5)
        if kind == 1:  # a field of the envelope, or of its properties, of another type or missing
            target = rng.choice([payload, properties])
            key = rng.choice(sorted(target))
            if rng.random() < 0.5:
                del target[key]
            else:
                target[key] = rng.choice(WRONG) if rng.random() < 0.7 else random_json(rng)
            if target is properties and key == "delivery_tag" and rng.random() < 0.5:
                properties["delivery_tag"] = f"tag-{n}"  # keep it holdable, the rest broken
        elif kind == 2:  # a body that is not base64
            payload["body"] = rng.choice(["%%%", "é", "abc", encoded[:-1]])
        elif kind == 3:
            return rng.randbytes(rng.randint(0, 200))
        elif kind == 4:
            return JSON.dumps(random_json(rng))
        return JSON.dumps(payload)

    async def publish_bad(self, first: int, count: int) -> None:
        keys = self.broker.list_keys(self.queue)
        async with self.raw.pipeline(transaction=False) as pipe:
            for n in range(first, first + count):
                pipe.lpush(self.rng.choice(keys), self.envelope(n))
            await pipe.execute()

    async def settled(self) -> bool:
        sizes = [await self.raw.llen(key) for key in self.broker.list_keys(self.queue)]
        return sum(sizes) == 0 and await self.raw.hlen(self.broker.unacked_key) == 0

    async def aclose(self) -> None:
        await self.raw.aclose()


FUZZ = {"redis": RedisFuzz, "kombu": KombuFuzz, "amqp": AMQPFuzz, "sqlite": SQLiteFuzz}


@asynccontextmanager
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler meanwhile ("Task exception was never retrieved", ...)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, why
        await asyncio.sleep(0.1)


async def _more_dead_than(app: App, queue: str, count: int) -> bool:
    return len(await app.broker.dead_letters(queue)) > count


@pytest.fixture(params=sorted(FUZZ))
async def fuzz_transport(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Transport]:
    async with transport_for(request.param, tmp_path, unique) as transport:
        if transport.kind == "amqp":  # results in Redis, so that messages with any reply_to can be stored
            transport.backend_url = "redis://127.0.0.1:6379/15"
            transport.backend_options = {"global_keyprefix": transport.prefix}
        yield transport


async def test_random_and_mutated_messages_never_stop_the_worker(
    fuzz_transport: Transport, make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="aqueue")  # a thousand rejections: keep only what is fatal
    seed = f"seed={SEED} (AQUEUE_FUZZ_SEED={SEED} replays it)"
    rng = random.Random(SEED)
    app = make_app(fuzz_transport, task_acks_late=True, accept_content=["json", "msgpack"])

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, loop_errors() as errors:
        fuzz = FUZZ[fuzz_transport.kind](app, fuzz_transport, rng)
        try:
            async with Worker(app, concurrency=20) as worker:
                # Given bad messages published raw, with good tasks among them
                results = []
                for round_ in range(ROUNDS):
                    await fuzz.publish_bad(round_ * BAD // ROUNDS, BAD // ROUNDS)
                    results += [add.delay(round_, n) for n in range(GOOD // ROUNDS)]
                # Then every good task completes, the worker is still up, and nothing stays unsettled
                values = [await r.get(timeout=60) for r in results]
                assert values == [r + n for r in range(ROUNDS) for n in range(GOOD // ROUNDS)], seed
                await until(fuzz.settled, 30, f"messages left unsettled; {seed}")
                assert worker.failure is None, seed
                # And most of the bad ones were dead-lettered (the rest ran, or were refused as expired)
                await until(
                    lambda: _more_dead_than(app, fuzz_transport.queue, BAD // 4),
                    10,
                    f"few dead letters; {seed}",
                )
        finally:
            await fuzz.aclose()
    assert not errors, f"{errors[:3]}; {seed}"
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL], seed
