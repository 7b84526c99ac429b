"""RedisBackend against the real Redis on 127.0.0.1:6379: what the contract suite does not cover."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqueue import states
from aqueue.exceptions import OperationalError, TimeoutError
from aqueue.result import from_url
from aqueue.result.base import TaskMeta
from aqueue.result.redis import RedisBackend

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
