"""RedisBackend against the real Redis on 127.0.0.1:6379: what the contract suite does not cover."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqueue import states
from aqueue.exceptions import OperationalError, TimeoutError
from aqueue.message import Message
from aqueue.result import from_url
from aqueue.result.base import TaskMeta
from aqueue.result.failure import exception_from_result, exception_to_result
from aqueue.result.redis import RedisBackend
from tests.stubborn import stubborn_task

URL = "redis://127.0.0.1:6379/0"
Factory = Callable[..., Awaitable[RedisBackend]]


@pytest.fixture
async def make_backend(prefix: str, unique: str, raw: aioredis.Redis) -> AsyncIterator[Factory]:
    """Connected backends with the test's key prefix, named ``r-<unique>`` unless told otherwise."""
    opened: list[RedisBackend] = []

    async def make(**options: Any) -> RedisBackend:
        options.setdefault("client_name", f"r-{unique}")
        backend = RedisBackend(URL, global_keyprefix=prefix, **options)
        await backend.connect()
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.aclose()


@pytest.fixture
async def backend(make_backend: Factory) -> RedisBackend:
    return await make_backend(expires=60)


async def connections(raw: aioredis.Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in await raw.client_list() if c["name"] == name]


def task_ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def test_from_url_builds_it_and_repr_masks_the_password() -> None:
    backend = from_url("rediss://:s3cret@127.0.0.1:6380/3", expires=10)
    assert isinstance(backend, RedisBackend)
    assert "s3cret" not in repr(backend) and "rediss://" in repr(backend)


async def test_result_is_a_celery_named_key_that_expires(backend: RedisBackend, raw: aioredis.Redis) -> None:
    # Given a result stored by a backend whose results expire after 60 s
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    # Then it is kept under Celery's key name, with a TTL of at most 60 s
    key = f"{backend.prefix}celery-task-meta-{tid}"
    assert await raw.exists(key)
    assert 0 < await raw.pttl(key) <= 60_000


GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "celery.json").read_text())["redis"]


async def test_a_state_is_stored_as_celerys_json(backend: RedisBackend, raw: aioredis.Redis) -> None:
    # Given a success stored for a task of a group, sent by another task
    tid = uuid.uuid4().hex
    request = Message(tid, "tasks.add", (20, 22), group="g-1", parent_id="p-1")
    await backend.store(TaskMeta(tid, states.SUCCESS, 42), request)
    # Then the key holds Celery's layout: its keys in Celery's order, group and parent before the id
    stored = json.loads(await raw.get(backend.key(tid)) or "null")
    celery = json.loads(GOLDEN["success"])
    assert list(stored) == [*list(celery)[:-1], "group_id", "parent_id", "task_id"]
    assert {k: stored[k] for k in ("status", "result", "traceback", "children", "task_id")} == {
        "status": "SUCCESS", "result": 42, "traceback": None, "children": [], "task_id": tid,
    }  # fmt: skip
    assert (stored["group_id"], stored["parent_id"]) == ("g-1", "p-1")
    assert datetime.fromisoformat(stored["date_done"]).tzinfo is not None


@pytest.mark.parametrize("label", ["success", "failure"])
async def test_what_celery_stored_is_read(label: str, backend: RedisBackend, raw: aioredis.Redis) -> None:
    # Given a state a Celery worker stored
    celery = json.loads(GOLDEN[label])
    await raw.set(backend.key(celery["task_id"]), GOLDEN[label], ex=60)
    # When it is read, then it is Celery's state, with its exception rebuilt
    meta = await backend.get(celery["task_id"])
    assert (meta.status, meta.traceback, meta.date_done) == (
        celery["status"],
        celery["traceback"],
        celery["date_done"],
    )
    if label == "failure":
        rebuilt = exception_from_result(meta.result)
        assert type(rebuilt) is ValueError and rebuilt.args == ("bad", 42)
    else:
        assert meta.result == 42


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
async def test_a_success_is_never_overwritten(serializer: str, make_backend: Factory) -> None:
    # Given a task whose success is stored
    backend = await make_backend(serializer=serializer, expires=60)
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    # When a second run of it (a redelivered copy) stores another state
    await backend.store(TaskMeta(tid, states.STARTED, {"pid": 1}))
    await backend.store(TaskMeta(tid, states.FAILURE, exception_to_result(ValueError("late"))))
    # Then the success stays
    meta = await backend.get(tid)
    assert (meta.status, meta.result) == (states.SUCCESS, 8)


async def test_every_state_is_published_as_celery_publishes_it(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    # Given a subscriber on a task's channel, as a Celery client's result consumer subscribes
    tid = uuid.uuid4().hex
    pubsub = raw.pubsub()
    await pubsub.subscribe(backend.key(tid))
    try:
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        # When the task starts, then succeeds
        await backend.store(TaskMeta(tid, states.STARTED, {"pid": 1, "hostname": "w"}))
        await backend.store(TaskMeta(tid, states.SUCCESS, 8))
        # Then both states are published, not only the ready one
        published = [await pubsub.get_message(timeout=2) for _ in range(2)]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert [json.loads(m["data"])["status"] for m in published if m] == [states.STARTED, states.SUCCESS]


async def test_without_expires_results_are_kept(make_backend: Factory, raw: aioredis.Redis) -> None:
    backend = await make_backend()
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    assert await raw.pttl(backend.key(tid)) == -1


async def test_forget_deletes_the_key(backend: RedisBackend, raw: aioredis.Redis) -> None:
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    await backend.forget(tid)
    assert not await raw.exists(backend.key(tid))


async def test_writes_of_one_loop_turn_share_one_round_trip(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a backend whose round trips are counted
    await backend.connect()
    conn = backend._batcher.conn
    real_send = conn.send_packed_command
    sent: list[Any] = []

    async def counting_send(command: Any, check_health: bool = True) -> None:
        sent.append(command)
        await real_send(command, check_health)

    monkeypatch.setattr(conn, "send_packed_command", counting_send)
    # When 500 results are stored at once, each by its own caller
    ids = task_ids(500)
    await asyncio.gather(*(backend.store(TaskMeta(tid, states.SUCCESS, i)) for i, tid in enumerate(ids)))
    # Then one round trip carried them
    assert len(sent) == 1
    # And 500 reads at once take one more, each caller getting its own result
    metas = await asyncio.gather(*(backend.get(tid) for tid in ids))
    assert len(sent) == 2
    assert [m.result for m in metas] == list(range(500))


async def test_wait_returns_a_result_stored_before_it_started(backend: RedisBackend) -> None:
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, "early"))
    meta = await asyncio.wait_for(backend.wait(tid, timeout=2), 5)
    assert meta.result == "early"


async def test_wait_for_a_result_stored_already_reads_it_without_subscribing(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stored result, and a backend whose listener must not be used
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, "stored"))

    def no_watch(channel: bytes) -> Any:
        raise AssertionError(f"subscribed to {channel!r}")

    monkeypatch.setattr(backend._listener, "watch", no_watch)
    # When waiting for it; Then it is read in one round trip, without subscribing to its channel
    meta = await asyncio.wait_for(backend.wait(tid, timeout=2), 5)
    assert meta.result == "stored"


async def test_waits_subscribe_first_while_results_are_not_ready_at_once_and_read_first_again_after(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    get = backend.get

    async def counted(task_id: str) -> TaskMeta:
        reads.append(task_id)
        return await get(task_id)

    monkeypatch.setattr(backend, "get", counted)

    async def wait_for_late_result() -> None:
        tid = uuid.uuid4().hex
        waiting = asyncio.ensure_future(backend.wait(tid, timeout=5))
        await asyncio.sleep(0.05)
        await backend.store(TaskMeta(tid, states.SUCCESS, 1))
        assert (await asyncio.wait_for(waiting, 5)).result == 1

    # Given waits whose results were stored only after they started (as a result waited for right
    # after its task was sent)
    for _ in range(8):
        await wait_for_late_result()
    # When one more such wait runs; Then it reads the key once only, after subscribing
    reads.clear()
    await wait_for_late_result()
    assert len(reads) == 1
    # And when results are ready at once again for a while, a wait reads first and does not subscribe
    for _ in range(8):
        tid = uuid.uuid4().hex
        await backend.store(TaskMeta(tid, states.SUCCESS, 2))
        assert (await asyncio.wait_for(backend.wait(tid, timeout=5), 5)).result == 2
    tid = uuid.uuid4().hex
    await backend.store(TaskMeta(tid, states.SUCCESS, 3))

    def no_watch(channel: bytes) -> Any:
        raise AssertionError(f"subscribed to {channel!r}")

    monkeypatch.setattr(backend._listener, "watch", no_watch)
    assert (await asyncio.wait_for(backend.wait(tid, timeout=5), 5)).result == 3


async def test_wait_is_woken_by_a_store_from_another_backend(make_backend: Factory) -> None:
    # Given a waiter on one backend
    waiter, writer = await make_backend(), await make_backend(client_name="writer")
    tid = uuid.uuid4().hex
    waiting = asyncio.ensure_future(waiter.wait(tid, timeout=5))
    await asyncio.sleep(0.2)
    # When another process (backend) stores the result
    started = time.monotonic()
    await writer.store(TaskMeta(tid, states.FAILURE, {"exc_type": "ValueError", "exc_message": "no"}))
    # Then the waiter returns at once, without polling
    meta = await asyncio.wait_for(waiting, 5)
    assert meta.status == states.FAILURE
    assert time.monotonic() - started < 0.3


async def test_two_thousand_waits_share_a_few_connections(
    make_backend: Factory, raw: aioredis.Redis, unique: str
) -> None:
    # Given 2,000 tasks waited on at once through one backend
    backend = await make_backend()
    writer = await make_backend(client_name=f"w-{unique}")
    ids = task_ids(2000)
    waits = [asyncio.ensure_future(backend.wait(tid, timeout=10)) for tid in ids]
    await asyncio.sleep(0.3)
    # Then the backend uses a handful of connections, one of them subscribed to every channel
    used = await connections(raw, f"r-{unique}")
    assert len(used) == 2
    assert max(int(c["sub"]) for c in used) == 2000
    # When every result is stored
    await asyncio.gather(*(writer.store(TaskMeta(tid, states.SUCCESS, i)) for i, tid in enumerate(ids)))
    # Then every wait resolves with its own result
    metas = await asyncio.wait_for(asyncio.gather(*waits), 10)
    assert [m.result for m in metas] == list(range(2000))
    # And the channels are given up
    await asyncio.sleep(0.1)
    assert max(int(c["sub"]) for c in await connections(raw, f"r-{unique}")) == 0


async def test_timeout_raises_and_unsubscribes(backend: RedisBackend, raw: aioredis.Redis) -> None:
    tid = uuid.uuid4().hex
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(backend.wait(tid, timeout=0.2), 5)
    with pytest.raises(TimeoutError):
        await backend.wait(tid, timeout=0)
    await asyncio.sleep(0.1)
    assert await raw.pubsub_numsub(backend.key(tid)) == [(backend.key(tid).encode(), 0)]


async def test_many_waiters_of_one_task_all_wake(backend: RedisBackend) -> None:
    tid = uuid.uuid4().hex
    waits = [asyncio.ensure_future(backend.wait(tid, timeout=5)) for _ in range(5)]
    await asyncio.sleep(0.1)
    await backend.store(TaskMeta(tid, states.SUCCESS, 1))
    assert [m.result for m in await asyncio.wait_for(asyncio.gather(*waits), 5)] == [1] * 5


async def test_wait_survives_the_loss_of_the_pubsub_connection(
    backend: RedisBackend, raw: aioredis.Redis, unique: str
) -> None:
    # Given a waiter subscribed to its task's channel
    tid = uuid.uuid4().hex
    waiting = asyncio.ensure_future(backend.wait(tid, timeout=8))
    await asyncio.sleep(0.2)
    [subscriber] = [c for c in await connections(raw, f"r-{unique}") if int(c["sub"]) > 0]
    # When the server kills that connection, and the result is stored while it is down
    await raw.client_kill_filter(_id=subscriber["id"])
    await raw.set(backend.key(tid), backend.serializer.dumps(TaskMeta(tid, states.SUCCESS, 5).to_dict()))
    # Then the waiter reads the key again once reconnected, and returns
    assert (await asyncio.wait_for(waiting, 8)).result == 5
    # And later waits are woken by messages again
    other = uuid.uuid4().hex
    waiting = asyncio.ensure_future(backend.wait(other, timeout=5))
    await asyncio.sleep(0.1)
    await backend.store(TaskMeta(other, states.SUCCESS, 6))
    assert (await asyncio.wait_for(waiting, 5)).result == 6


async def test_unreachable_server_raises_operational_error() -> None:
    backend = RedisBackend("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(OperationalError):
            await asyncio.wait_for(backend.get("x"), 10)
        with pytest.raises(OperationalError):
            await asyncio.wait_for(backend.wait("x", timeout=5), 10)
    finally:
        await backend.aclose()


async def test_closing_the_backend_ends_its_waits(make_backend: Factory) -> None:
    # Given a wait without a timeout
    backend = await make_backend()
    waiting = asyncio.ensure_future(backend.wait(uuid.uuid4().hex))
    await asyncio.sleep(0.1)
    # When the backend is closed, then the wait ends with an error instead of hanging
    await backend.aclose()
    with pytest.raises(OperationalError, match="closed"):
        await asyncio.wait_for(waiting, 5)


async def test_a_server_that_never_answers_raises_after_socket_timeout(silent_url: str) -> None:
    backend = RedisBackend(silent_url, socket_timeout=0.3)
    try:
        with pytest.raises(OperationalError):
            await asyncio.wait_for(backend.get("x"), 5)
        with pytest.raises(OperationalError):
            await asyncio.wait_for(backend.wait("x"), 5)
    finally:
        await backend.aclose()


async def test_a_chords_join_keys_expire(make_backend: Factory, raw: aioredis.Redis, prefix: str) -> None:
    # Given a backend whose results expire after a minute, and a chord part reported to it
    backend = await make_backend(expires=60)
    group_id = uuid.uuid4().hex
    await backend.chord_join(group_id, 0, 1, TaskMeta("t0", states.SUCCESS, 1))
    await backend.chord_sent(group_id)
    # Then both of the join's keys carry that time to live
    for key in (f"{prefix}chord-parts-{group_id}", f"{prefix}chord-{group_id}"):
        assert 0 < await raw.pttl(key) <= 60_000, key


async def test_closing_stops_a_result_listener_that_loses_a_cancellation() -> None:
    # Given a backend whose pub/sub reader swallows its first cancellation, as redis-py can
    backend = RedisBackend("redis://127.0.0.1:6379/0")
    reader, swallowed = stubborn_task()
    backend._listener._reader = reader
    await asyncio.sleep(0)
    # When the backend closes, then the reader is stopped all the same, at once
    started = time.monotonic()
    async with asyncio.timeout(10):
        await backend.aclose()
    assert time.monotonic() - started < 5
    assert swallowed.is_set() and reader.cancelled()
