"""Redis Sentinel (``sentinel://`` URLs): configuration errors, the tour, and every Redis user after a failover.

The deployments are private (tests/redis_servers.py): a master, a replica and three sentinels on
loopback. One serves the tour's and the broker contract's own tests, run here unchanged; each failover
test has one of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aqueue import App
from aqueue._redis import redis_client
from aqueue._sentinel import _SentinelPool
from aqueue.broker import from_url as broker_from_url
from aqueue.canvas import chord
from aqueue.exceptions import ImproperlyConfigured, OperationalError
from aqueue.result import from_url as backend_from_url
from aqueue.worker import Worker
from tests import test_tour
from tests.broker import test_contract
from tests.conftest import Transport
from tests.redis_servers import (
    SentinelSet,
    free_port,
    sentinel_set,
    sentinel_set_sync,
    suite_of,
    transport_on,
)

WAIT = 20.0

globals().update(suite_of(test_tour, "app", "transport"))
globals().update(suite_of(test_contract, "broker", "broker_transport"))


@pytest.fixture(scope="module")
def shared_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    with sentinel_set_sync(tmp_path_factory.mktemp("sentinels")) as deployment:
        yield deployment


@pytest.fixture
def transport(shared_sentinels: SentinelSet, tmp_path: Path, unique: str) -> Transport:
    return transport_on(shared_sentinels.url(), shared_sentinels.options, tmp_path, unique)


@pytest.fixture
def app(make_app: Callable[..., App], transport: Transport) -> App:
    return make_app(transport)


@pytest.fixture
def broker_transport(transport: Transport) -> Transport:
    """The transport of conftest's ``broker`` fixture, which the contract's tests take."""
    return transport


@pytest.fixture
async def sentinels(tmp_path: Path) -> AsyncIterator[SentinelSet]:
    async with sentinel_set(tmp_path) as deployment:
        yield deployment


def sentinel_app(deployment: SentinelSet, **settings: Any) -> App:
    unique = uuid.uuid4().hex[:8]
    options = dict(deployment.options, global_keyprefix=f"t{unique}:")
    return App(
        "tasks",
        broker=deployment.url(),
        backend=deployment.url(),
        broker_transport_options=options,
        result_backend_transport_options=options,
        task_default_queue=f"q-{unique}",
        control_exchange=f"ctl-{unique}",
        **settings,
    )


def register(app: App) -> Any:
    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.tsum")
    async def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="tasks.fail")
    async def fail() -> None:
        raise ValueError("boom")

    @app.task(name="tasks.shared", global_rate_limit="50/s")
    async def shared(n: int) -> int:
        return n

    return add, tsum, fail, shared


def test_a_sentinel_url_needs_the_master_name() -> None:
    # Given sentinel:// URLs without the master_name transport option
    url = "sentinel://:pw@127.0.0.1:26379;sentinel://:pw@127.0.0.1:26380/0"
    # Then the broker and the backend refuse them, saying which option to set, password masked
    with pytest.raises(ImproperlyConfigured, match=r"broker_transport_options=\{'master_name'") as raised:
        broker_from_url(url)
    assert "pw@" not in str(raised.value) and ":**@" in str(raised.value)
    with pytest.raises(ImproperlyConfigured, match=r"result_backend_transport_options=\{'master_name'"):
        backend_from_url(url)
    # And a misspelt option names the right one
    with pytest.raises(ImproperlyConfigured, match="master_name"):
        backend_from_url(url, options={"master_nam": "mymaster"})


def test_parts_of_a_sentinel_url_may_not_disagree() -> None:
    from aqueue.exceptions import InvalidURL

    with pytest.raises(InvalidURL, match="different values of db"):
        broker_from_url("sentinel://h1:26379/1;sentinel://h2:26379/2", {"master_name": "m"})


async def test_unreachable_sentinels_fail_clearly_with_the_password_masked() -> None:
    # Given sentinels that nobody listens on
    ports = [free_port(), free_port()]
    url = ";".join(f"sentinel://:secret@127.0.0.1:{p}" for p in ports)
    options = {"master_name": "mymaster", "sentinel_kwargs": {"password": "sentinel-secret"}}
    # When the broker and the backend connect, then they fail naming the master and the sentinels
    for resource in (broker_from_url(url, options), backend_from_url(url, options=options)):
        with anyio.fail_after(WAIT), pytest.raises(OperationalError) as raised:
            await resource.connect()
        await resource.aclose()
        message = str(raised.value)
        assert "'mymaster'" in message and all(f"127.0.0.1:{p}" in message for p in ports), message
        assert "secret" not in message, message


async def test_the_tour_on_sentinel(shared_sentinels: SentinelSet) -> None:
    # Given an app whose broker and backend are the Sentinel-managed master
    app = sentinel_app(shared_sentinels)
    add, _, fail, _ = register(app)
    async with app, Worker(app, concurrency=4, hostname=f"w-{uuid.uuid4().hex[:8]}"):
        # Then the tour's calls work: delay/get, ready, a failure re-raised, forget
        result = add.delay(4, 4)
        assert await result.get(timeout=WAIT) == 8
        assert await result.ready()
        with pytest.raises(ValueError, match="boom"):
            await fail.delay().get(timeout=WAIT)
        await result.forget()
        assert (await app.backend.get(result.id)).status == "PENDING"
        # And the backend's repr names the sentinels with the master's password masked
        assert ":**@" in repr(app.backend) and "master-secret" not in repr(app.backend)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "master killed"])
async def test_every_redis_user_follows_a_failover(sentinels: SentinelSet, how: str) -> None:
    # Given a worker on the Sentinel-managed master, and a subscriber listening for remote control
    app = sentinel_app(sentinels)
    add, tsum, _, shared = register(app)
    async with app, Worker(app, concurrency=8, hostname=f"w-{uuid.uuid4().hex[:8]}") as worker:
        assert await add.delay(1, 1).get(timeout=WAIT) == 2
        # When the master fails over to the replica (asked to, or because the master died)
        old = await sentinels.master()
        if how == "master killed":
            new = await sentinels.crash_master()
        else:
            new = await sentinels.failover(follow=False)
        assert new is not old
        # Then the broker, the backend, the shared rate limit, chords and remote control all work on
        # the new master (each may take a reconnection first)
        with anyio.fail_after(WAIT * 2):
            assert await add.delay(2, 3).get(timeout=WAIT) == 5
            assert await shared.delay(7).get(timeout=WAIT) == 7
            assert await chord(add.s(i, i) for i in range(5))(tsum.s()).get(timeout=WAIT) == 20
            while not (replies := await app.control.ping(timeout=1.0)):
                await anyio.sleep(0.1)
        assert worker.hostname in str(replies)
    # And the new master holds what was stored after the failover
    client = new.client()
    try:
        assert await client.dbsize() > 0
    finally:
        await client.aclose()


async def test_the_kombu_layout_on_sentinel(shared_sentinels: SentinelSet, unique: str) -> None:
    from aqueue.message import Envelope

    # Given a broker on Sentinel with Celery's list layout
    options = dict(shared_sentinels.options, layout="kombu", global_keyprefix=f"t{unique}:")
    async with broker_from_url(shared_sentinels.url(), options) as broker:
        # When a message is published, then a consumer gets it
        await broker.publish([Envelope(f"id-{unique}", f"q-{unique}", b"[]", "application/json")])
        async with broker.consume([f"q-{unique}"], 1) as consumer:
            with anyio.fail_after(WAIT):
                delivery = await consumer.receive()
            await delivery.ack()
        assert delivery.id == f"id-{unique}"


async def test_no_sentinel_round_trip_goes_through_wait_for(
    shared_sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a record of asyncio.wait_for's uses: on Python 3.11 it loses a cancellation that comes as
    # what it waits for completes, and redis-py sends through it on a connection with a socket_timeout
    uses: list[float | None] = []
    wait_for = asyncio.wait_for

    async def recorded(awaitable: Any, timeout: float | None) -> Any:
        uses.append(timeout)
        return await wait_for(awaitable, timeout)

    monkeypatch.setattr(asyncio, "wait_for", recorded)
    follows: list[None] = []
    follow = _SentinelPool._follow

    async def counted(self: _SentinelPool) -> None:
        await follow(self)
        follows.append(None)

    monkeypatch.setattr(_SentinelPool, "_follow", counted)
    # When a client connects (asking the sentinels for the master), its event listeners subscribe and
    # look the master up, and it is closed
    client = redis_client(shared_sentinels.url(), shared_sentinels.options)
    try:
        with anyio.fail_after(WAIT):
            await client.ping()
            while len(follows) < len(shared_sentinels.sentinels):
                await asyncio.sleep(0.01)
    finally:
        with anyio.fail_after(WAIT):
            await client.aclose()
    # Then none of it went through asyncio.wait_for
    assert uses == []


async def test_closing_stops_the_event_listeners_even_if_a_cancellation_is_lost(
    shared_sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given event listeners whose first look-up of the master loses the cancellation that reaches it,
    # as a library under them may (asyncio.wait_for on Python 3.11)
    waiting: list[None] = []
    lost: list[None] = []
    follow = _SentinelPool._follow

    async def losing(self: _SentinelPool) -> None:
        if len(waiting) < len(shared_sentinels.sentinels):
            waiting.append(None)
            try:
                await asyncio.sleep(WAIT)
            except asyncio.CancelledError:
                lost.append(None)
        await follow(self)

    monkeypatch.setattr(_SentinelPool, "_follow", losing)
    client = redis_client(shared_sentinels.url(), shared_sentinels.options)
    with anyio.fail_after(WAIT):
        await client.ping()
        while len(waiting) < len(shared_sentinels.sentinels):
            await asyncio.sleep(0.01)
    name = "_SentinelPool._listen_forever"
    listeners = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == name]
    assert len(listeners) == len(shared_sentinels.sentinels)
    # When the client is closed
    try:
        with anyio.fail_after(WAIT):
            await client.aclose()
        # Then every listener lost a cancellation, and stopped all the same
        assert len(lost) == len(shared_sentinels.sentinels)
        assert all(listener.done() for listener in listeners)
    finally:
        for listener in listeners:
            listener.cancel()
