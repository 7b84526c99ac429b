"""RPCBackend against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).

A "client" backend prepares messages and waits; a "worker" backend stores states for the message it
runs, as a worker process would.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from aqueue import states
from aqueue.broker import amqp_reader
from aqueue.exceptions import AqueueError, ImproperlyConfigured, OperationalError
from aqueue.exceptions import TimeoutError as AqueueTimeoutError
from aqueue.message import Message, decode_message, encode_message
from aqueue.result import from_url
from aqueue.result.base import TaskMeta
from aqueue.result.failure import exception_from_result, exception_to_result
from aqueue.result.rpc import RPCBackend
from aqueue.serialization import get_serializer
from tests.conftest import rabbitmqctl, require_server

URL = "amqp://guest:guest@127.0.0.1:5672//"
JSON = get_serializer("json")


@pytest.fixture
async def client() -> AsyncIterator[RPCBackend]:
    require_server("amqp")
    async with RPCBackend(broker_url=URL) as backend:
        yield backend


@pytest.fixture
async def worker() -> AsyncIterator[RPCBackend]:
    require_server("amqp")
    async with RPCBackend(broker_url=URL) as backend:
        yield backend


def sent_by(client: RPCBackend) -> Message:
    """A task message as the worker decodes it, after the client prepared and encoded it."""
    message = Message(str(uuid.uuid4()), "tasks.add", (4, 4))
    client.prepare(message)
    return decode_message(encode_message(message, JSON), JSON.content_type, frozenset({JSON.content_type}))


@pytest.mark.parametrize("broker_url", [None, "redis://127.0.0.1:6379", "memory://", "sqlite:///q.db"])
def test_needs_an_amqp_broker(broker_url: str | None) -> None:
    with pytest.raises(ImproperlyConfigured, match="rpc:// result backend sends results over an AMQP broker"):
        from_url("rpc://", broker_url=broker_url)


def test_from_url_accepts_the_celery_broker_url() -> None:
    backend = from_url("rpc://", broker_url="pyamqp://guest@127.0.0.1//")
    assert isinstance(backend, RPCBackend)
    assert str(backend) == "<RPCBackend rpc://>"


async def test_prepare_sets_reply_to(client: RPCBackend) -> None:
    message = Message("id-1", "tasks.add")
    client.prepare(message)
    assert message.reply_to == client.reply_to


async def test_worker_store_reaches_the_waiting_client(client: RPCBackend, worker: RPCBackend) -> None:
    # Given a message the client sent, as the worker received it
    request = sent_by(client)
    # When the worker stores STARTED, then SUCCESS, for it
    await worker.store(TaskMeta(request.id, states.STARTED, name=request.task), request)
    await worker.store(TaskMeta(request.id, states.SUCCESS, 8, name=request.task), request)
    # Then the client's wait returns the success, with its result and completion time
    meta = await client.wait(request.id, timeout=5)
    assert (meta.status, meta.result) == (states.SUCCESS, 8)
    assert meta.date_done is not None
    assert (await client.get(request.id)).status == states.SUCCESS


async def test_started_is_seen_before_the_result(client: RPCBackend, worker: RPCBackend) -> None:
    request = sent_by(client)
    await worker.store(TaskMeta(request.id, states.STARTED), request)
    deadline = time.monotonic() + 5
    while (await client.get(request.id)).status != states.STARTED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_failure_comes_back_with_its_traceback(client: RPCBackend, worker: RPCBackend) -> None:
    request = sent_by(client)
    failure = {"exc_type": "ValueError", "exc_module": "builtins", "exc_message": ["bad"]}
    await worker.store(TaskMeta(request.id, states.FAILURE, failure, "Traceback ..."), request)
    meta = await client.wait(request.id, timeout=5)
    assert (meta.status, meta.result, meta.traceback) == (states.FAILURE, failure, "Traceback ...")


async def test_wait_on_a_task_sent_elsewhere_raises_at_once(client: RPCBackend) -> None:
    started = time.monotonic()
    with pytest.raises(AqueueError, match="only to the process that sent the task"):
        await client.wait(str(uuid.uuid4()), timeout=30)
    assert time.monotonic() - started < 1


async def test_unknown_task_is_pending(client: RPCBackend) -> None:
    assert (await client.get(str(uuid.uuid4()))).status == states.PENDING


async def test_wait_times_out(client: RPCBackend) -> None:
    request = sent_by(client)
    with pytest.raises(AqueueTimeoutError):
        await client.wait(request.id, timeout=0.2)
    assert (await client.get(request.id)).status == states.PENDING


async def test_forget_makes_it_pending(client: RPCBackend, worker: RPCBackend) -> None:
    # Given a result the client received
    request = sent_by(client)
    await worker.store(TaskMeta(request.id, states.SUCCESS, 8), request)
    await client.wait(request.id, timeout=5)
    # When it is forgotten
    await client.forget(request.id)
    # Then it is PENDING, and a late reply does not bring it back
    assert (await client.get(request.id)).status == states.PENDING
    await worker.store(TaskMeta(request.id, states.SUCCESS, 8), request)
    await asyncio.sleep(0.2)
    assert (await client.get(request.id)).status == states.PENDING


async def test_store_without_reply_to_does_nothing(worker: RPCBackend) -> None:
    await worker.store(TaskMeta("x", states.SUCCESS, 1), None)
    await worker.store(TaskMeta("x", states.SUCCESS, 1), Message("x", "tasks.add"))


async def test_many_waits_share_one_consumer(client: RPCBackend, worker: RPCBackend) -> None:
    # Given 200 tasks the client sent, each awaited concurrently
    requests = [sent_by(client) for _ in range(200)]
    waits = [asyncio.ensure_future(client.wait(r.id, timeout=10)) for r in requests]
    # When the worker stores each result
    await asyncio.gather(
        *(worker.store(TaskMeta(r.id, states.SUCCESS, i), r) for i, r in enumerate(requests))
    )
    # Then every waiter gets its own result
    metas = await asyncio.gather(*waits)
    assert [m.result for m in metas] == list(range(200))
    assert [m.task_id for m in metas] == [r.id for r in requests]
    # And all of them came through the one consumer of the reply queue
    channel = await client.broker.channel()
    try:
        queue = await channel.declare_queue(client.reply_to, passive=True, robust=False)
        assert queue.declaration_result.consumer_count == 1
    finally:
        await channel.close()


async def test_states_stored_in_one_loop_turn_travel_as_one_message_per_client(
    worker: RPCBackend,
) -> None:
    # Given two clients, with 50 and 30 tasks sent, each awaited
    async with RPCBackend(broker_url=URL) as first, RPCBackend(broker_url=URL) as second:
        requests = [sent_by(first) for _ in range(50)] + [sent_by(second) for _ in range(30)]
        owners = [first] * 50 + [second] * 30
        waits = [
            asyncio.ensure_future(owner.wait(r.id, timeout=10))
            for owner, r in zip(owners, requests, strict=True)
        ]
        delivered: list[int] = []
        for owner in (first, second):
            await owner.connect()
            assert owner._outbox is not None
            consumers = amqp_reader.callbacks(owner._outbox.channel)
            tag, receive = next(iter(consumers.items()))
            consumers[tag] = _counting(receive, delivered)
        # When the worker stores all 80 results in the same loop turn
        await asyncio.gather(
            *(worker.store(TaskMeta(r.id, states.SUCCESS, i), r) for i, r in enumerate(requests))
        )
        # Then every waiter gets its own result
        metas = await asyncio.gather(*waits)
        assert [m.result for m in metas] == list(range(80))
        assert [m.task_id for m in metas] == [r.id for r in requests]
        # And each client received them in one message
        assert delivered == [1, 1]


async def test_a_state_that_cannot_be_encoded_fails_its_store_alone(
    client: RPCBackend, worker: RPCBackend
) -> None:
    # Given two tasks of one client, one of whose results cannot be encoded
    good, bad = sent_by(client), sent_by(client)
    # When the worker stores both in the same loop turn
    stores = await asyncio.wait_for(
        asyncio.gather(
            worker.store(TaskMeta(good.id, states.SUCCESS, 8), good),
            worker.store(TaskMeta(bad.id, states.SUCCESS, object()), bad),
            return_exceptions=True,
        ),
        5,
    )
    # Then the bad one's store raises, and the good one's result still reaches the client
    assert stores[0] is None and isinstance(stores[1], Exception)
    assert (await client.wait(good.id, timeout=5)).result == 8


def _counting(receive: Any, counts: list[int]) -> Any:
    def counted(message: Any) -> None:
        counts.append(1)
        receive(message)

    return counted


async def test_aclose_ends_waits(worker: RPCBackend) -> None:
    require_server("amqp")
    client = RPCBackend(broker_url=URL)
    await client.connect()
    request = sent_by(client)
    waiting = asyncio.ensure_future(client.wait(request.id, timeout=10))
    await asyncio.sleep(0.1)
    await client.aclose()
    with pytest.raises(OperationalError):
        await waiting


async def test_end_to_end_with_app_and_worker(unique: str) -> None:
    require_server("amqp")
    from aqueue import App
    from aqueue.broker.amqp import AMQPBroker
    from aqueue.worker import Worker

    # Given the first-steps app on RabbitMQ with rpc:// results
    app = App("tasks", broker="pyamqp://guest@127.0.0.1//", backend="rpc://")
    app.conf.task_default_queue = f"t-rpc-{unique}"
    app.conf.task_track_started = True

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        async with app, Worker(app, concurrency=4):
            # When a task is sent and awaited, then its result comes back
            assert await asyncio.wait_for(add.delay(4, 4).get(timeout=10), 15) == 8
    finally:
        async with AMQPBroker(URL) as broker:
            await broker.delete_queue(app.conf.task_default_queue)


async def test_results_arrive_after_close_all_connections(vhost: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    async with RPCBackend(broker_url=url) as client, RPCBackend(broker_url=url) as worker:
        # Given a client waiting for a task it sent
        request = sent_by(client)
        waiting = asyncio.ensure_future(client.wait(request.id, timeout=20))
        await asyncio.sleep(0.1)
        # When RabbitMQ closes every connection
        await rabbitmqctl("close_all_connections", "-p", vhost, "aqueue test")
        # Then the client's reply queue comes back with its connection
        deadline = time.monotonic() + 15
        while not await reply_queue_exists(client):
            assert time.monotonic() < deadline, "the reply queue did not come back"
            await asyncio.sleep(0.1)
        # And a result stored then reaches the waiting client
        await worker.store(TaskMeta(request.id, states.SUCCESS, 8), request)
        assert (await waiting).result == 8


async def reply_queue_exists(client: RPCBackend) -> bool:
    try:
        channel = await client.broker.channel()
        try:
            await channel.declare_queue(client.reply_to, passive=True, robust=False)
        finally:
            await channel.close()
    except Exception:
        return False
    return True


GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "celery.json").read_text())["messages"]


async def test_a_client_that_did_not_ask_for_batches_gets_celerys_replies(worker: RPCBackend) -> None:
    # Given a reply queue of a client that sends Celery's messages (no batch header), and three of its tasks
    channel = await worker.broker.channel()
    reply_queue = f"celery-client-{uuid.uuid4().hex[:8]}"
    declared = await channel.declare_queue(reply_queue, auto_delete=True, robust=False)
    requests = [Message(str(uuid.uuid4()), "tasks.add", (i, i), reply_to=reply_queue) for i in range(3)]
    try:
        # When the worker stores their results in one loop turn, one of them a failure
        await asyncio.gather(
            worker.store(TaskMeta(requests[0].id, states.SUCCESS, 0), requests[0]),
            worker.store(TaskMeta(requests[1].id, states.SUCCESS, 2), requests[1]),
            worker.store(
                TaskMeta(requests[2].id, states.FAILURE, exception_to_result(ValueError("boom", 42)), "tb"),
                requests[2],
            ),
        )
        replies = [await declared.get(no_ack=True, timeout=5) for _ in range(3)]
    finally:
        await channel.queue_delete(reply_queue)
        await channel.close()
    # Then each state came as a message of its own, with the properties Celery's rpc backend gives it
    celery = GOLDEN["rpc_success"]["properties"]
    for reply, request in zip(replies, requests, strict=True):
        assert (
            reply.content_type,
            reply.content_encoding,
            int(reply.delivery_mode or 0),
            reply.priority,
        ) == (
            celery["content_type"],
            celery["content_encoding"],
            celery["delivery_mode"],
            celery["priority"],
        )
        assert (reply.correlation_id, reply.type, reply.expiration) == (request.id, None, None)
    # And bodies in Celery's layout, key for key
    bodies = [json.loads(reply.body) for reply in replies]
    assert [list(body) for body in bodies] == [list(json.loads(GOLDEN["rpc_success"]["body"]))] * 3
    assert bodies[2]["result"] == {
        "exc_type": "ValueError",
        "exc_message": ["boom", 42],
        "exc_module": "builtins",
    }


async def test_a_celery_workers_reply_is_read(client: RPCBackend) -> None:
    # Given a task sent by this client, and Celery's reply to it as a Celery worker publishes it
    message = sent_by(client)
    reply = json.loads(GOLDEN["rpc_failure"]["body"]) | {"task_id": message.id}
    channel = await client.broker.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(reply).encode(),
                content_type="application/json",
                content_encoding="utf-8",
                correlation_id=message.id,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            routing_key=client.reply_to,
        )
    finally:
        await channel.close()
    # Then the client's wait returns Celery's failure, with the exception Celery stored
    meta = await client.wait(message.id, timeout=5)
    assert meta.status == states.FAILURE
    assert meta.traceback is not None and "ValueError" in meta.traceback
    rebuilt = exception_from_result(meta.result)
    assert type(rebuilt) is ValueError and rebuilt.args == ("boom", 42)
