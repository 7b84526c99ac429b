"""SPEC section 1, the Celery first-steps tour, row by row, with an in-process worker on every transport.

Each test names the tour row it holds to. Transports: memory, sqlite, redis, amqp (with rpc:// results)
and amqp with the redis result backend. The CLI rows are tested in tests/cli.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import pickle
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import aqueue
from aqueue import App, AsyncResult, states
from aqueue.broker.amqp import AMQPBroker
from aqueue.exceptions import (
    EncodeError,
    InvalidRate,
    InvalidURL,
    NoResultBackend,
    NotRegistered,
    ResultNotStored,
    TaskRevokedError,
    TimeLimitExceeded,
    UnknownSetting,
)
from aqueue.exceptions import TimeoutError as AqueueTimeoutError
from aqueue.message import Envelope
from aqueue.worker import Worker
from tests.conftest import REDIS_URL, Transport, require_server

MakeApp = Callable[..., App]
TOUR_KINDS = ["memory", "sqlite", "redis", "kombu", "amqp", "amqp+redis", "amqp+quorum"]
QUORUM = {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"}
"""Celery's settings for quorum queues: the default queue and every other one the tour uses."""
WAIT = 10.0
"""Upper bound for anything that should happen promptly (generous for the networked transports)."""


class TourError(Exception):
    """A task's own exception class, importable from this module."""


@pytest.fixture(params=TOUR_KINDS)
async def transport(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> AsyncIterator[Transport]:
    """A broker with its matching result backend (amqp: rpc://), plus amqp with redis results, and amqp
    with quorum queues."""
    kind: str = request.param
    transport = Transport(kind.partition("+")[0], tmp_path, unique)
    if kind == "amqp+redis":
        require_server("redis")
        transport.backend_url = f"{REDIS_URL}/{transport.redis_db}"
        transport.backend_options = {"global_keyprefix": transport.prefix}
    elif kind == "amqp+quorum":
        transport.settings = dict(QUORUM)
    yield transport
    await transport.cleanup()


@pytest.fixture
def app(make_app: MakeApp, transport: Transport) -> App:
    return make_app(transport)


@asynccontextmanager
async def worker(app: App, *queues: str, concurrency: int = 4, **options: Any) -> AsyncIterator[Worker]:
    """An in-process worker of ``app`` with a unique name; starting and stopping are bounded in time."""
    running = Worker(
        app,
        concurrency=concurrency,
        queues=list(queues) or None,
        hostname=f"w-{uuid.uuid4().hex[:8]}",
        **options,
    )
    with anyio.fail_after(WAIT):
        await running.start()
    try:
        yield running
    finally:
        with anyio.fail_after(WAIT + running.shutdown_timeout):
            await running.stop()


async def eventually(check: Callable[[], Any], timeout: float = WAIT) -> None:
    """Poll the async ``check`` until it returns true, at most ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


def register_add(app: App, name: str = "tasks.add") -> Any:
    @app.task(name=name)
    async def add(x: int, y: int) -> int:
        return x + y

    return add


# Row: `from aqueue import App` (`Celery` is an alias) ------------------------------------------


def test_celery_is_an_alias_of_app() -> None:
    # Given the package, when Celery is imported, then it is App itself
    from aqueue import Celery

    assert Celery is App is aqueue.App


@pytest.mark.parametrize(
    ("broker", "backend", "kinds"),
    [
        ("amqp://guest@localhost//", None, ("AMQPBroker", "DisabledBackend")),
        ("pyamqp://guest@localhost//", "rpc://", ("AMQPBroker", "RPCBackend")),
        ("pyamqp://", "rpc://", ("AMQPBroker", "RPCBackend")),
        ("amqp://guest@localhost//", "redis://localhost", ("AMQPBroker", "RedisBackend")),
        ("redis://localhost", "redis://localhost", ("RedisBroker", "RedisBackend")),
    ],
)
def test_the_tours_app_urls(
    make_app: MakeApp, broker: str, backend: str | None, kinds: tuple[str, str]
) -> None:
    # Given the tour's App(...) arguments (nothing connects until used)
    app = make_app(broker=broker, backend=backend)
    # Then the broker and backend are of the kinds the URLs name
    assert (type(app.broker).__name__, type(app.backend).__name__) == kinds


# Rows: add.delay(4, 4), await, ready(), get(timeout=1) --------------------------------------------


async def test_delay_returns_an_async_result_at_once_and_await_confirms_it(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        # When delay() is called (a plain call)
        result = add.delay(4, 4)
        # Then it is an AsyncResult at once, and awaiting it confirms the send and returns it
        assert isinstance(result, AsyncResult)
        assert isinstance(result.id, str) and result.id
        with anyio.fail_after(WAIT):
            assert await result is result
        assert await result.get(timeout=WAIT) == 8


async def test_delay_starts_publishing_without_being_awaited(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        # Given a delay() whose result is never awaited
        result = add.delay(2, 3)
        # When another handle to the same id waits for the result
        other = app.AsyncResult(result.id)
        # Then the task ran anyway
        assert await other.get(timeout=WAIT) == 5


async def test_ready_is_false_while_running_and_true_after(app: App) -> None:
    release = anyio.Event()

    @app.task
    async def slow() -> str:
        await release.wait()
        return "done"

    async with app, worker(app):
        # Given a task that is still running
        result = await slow.delay()
        # Then it is not ready
        assert await result.ready() is False
        # When it finishes, then it is ready
        release.set()
        await eventually(result.ready)
        assert await result.get(timeout=WAIT) == "done"


async def test_get_with_timeout_returns_the_value(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        # When the result of add(4, 4) is fetched with get(timeout=1)
        result = await add.delay(4, 4)
        # Then it is 8 (a slow transport gets a first wait before the one-second one)
        await eventually(result.ready)
        assert await result.get(timeout=1) == 8


async def test_get_timeout_raises_aqueue_timeout_error_a_builtin_timeout_error(app: App) -> None:
    release = anyio.Event()

    @app.task
    async def slow() -> None:
        await release.wait()

    async with app, worker(app):
        result = await slow.delay()
        # When get() times out
        started = time.monotonic()
        with pytest.raises(AqueueTimeoutError) as raised:
            await result.get(timeout=0.3)
        # Then it raised aqueue's TimeoutError, which is also the builtin one, after about the timeout
        assert isinstance(raised.value, TimeoutError)
        assert 0.25 <= time.monotonic() - started < WAIT
        release.set()
        await result.get(timeout=WAIT)


async def test_await_delay_get_in_one_line(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        # When delay and get are chained in one line, then the value comes back
        with anyio.fail_after(WAIT):
            assert await add.delay(4, 4).get() == 8


# Rows: failures, propagate=False, traceback --------------------------------------------------------


async def test_failing_task_reraises_its_original_class_and_message(app: App) -> None:
    @app.task
    async def fails() -> None:
        raise TourError("the tour went wrong")

    @app.task
    async def builtin_fails() -> None:
        raise ValueError("bad value")

    async with app, worker(app):
        # When the results of failed tasks are fetched, then their own exceptions are raised
        with pytest.raises(TourError, match="the tour went wrong"):
            await fails.delay().get(timeout=WAIT)
        with pytest.raises(ValueError, match="bad value"):
            await builtin_fails.delay().get(timeout=WAIT)


async def test_propagate_false_returns_the_exception_and_traceback_is_kept(app: App) -> None:
    @app.task
    async def fails() -> None:
        raise TourError("kept")

    async with app, worker(app):
        result = fails.delay()
        # Given no fetch yet, there is no traceback
        assert result.traceback is None
        # When the result is fetched with propagate=False
        exc = await result.get(timeout=WAIT, propagate=False)
        # Then the exception is returned, and the worker-side traceback is available
        assert isinstance(exc, TourError) and str(exc) == "kept"
        assert result.state == states.FAILURE
        assert isinstance(result.result, TourError)
        assert result.traceback is not None
        assert "TourError: kept" in result.traceback
        assert "raise TourError" in result.traceback
        assert await result.failed() and not await result.successful()


async def test_traceback_is_none_after_success(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        result = add.delay(1, 1)
        assert await result.get(timeout=WAIT) == 2
        assert result.traceback is None
        assert await result.successful()


# Row: state, status, result, date_done (no I/O), refresh(), unknown ids -----------------------------


async def test_properties_hold_the_last_state_fetched(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        result = add.delay(4, 4)
        # Given the task finished (seen through another handle)
        assert await app.AsyncResult(result.id).get(timeout=WAIT) == 8
        # Then this handle, which fetched nothing, still says PENDING, with nothing filled in
        assert (result.state, result.status, result.result, result.date_done) == (
            states.PENDING,
            states.PENDING,
            None,
            None,
        )
        # When it refreshes, then the properties hold what was fetched
        before = datetime.now(UTC) - timedelta(seconds=60)
        assert await result.refresh() == states.SUCCESS
        assert (result.state, result.status, result.result) == (states.SUCCESS, states.SUCCESS, 8)
        assert result.date_done is not None and result.date_done >= before


async def test_unknown_task_id_is_pending(app: App) -> None:
    async with app:
        # Given an id no task ever had
        result = app.AsyncResult(str(uuid.uuid4()))
        # When it is fetched, then it is PENDING and not ready
        assert await result.refresh() == states.PENDING
        assert await result.ready() is False
        assert result.result is None


async def test_forget_removes_the_stored_result(app: App) -> None:
    add = register_add(app)
    async with app, worker(app):
        result = add.delay(4, 4)
        assert await result.get(timeout=WAIT) == 8
        # When the result is forgotten
        await result.forget()
        # Then it reads as PENDING
        assert result.state == states.PENDING
        assert await result.refresh() == states.PENDING


# Row: print(result.backend) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "module"),
    [
        ("memory://user:s3cret@tour", "MemoryBackend", None),
        ("redis://:s3cret@127.0.0.1:6379/3", "RedisBackend", "aqueue.result.redis"),
        ("rediss://user:s3cret@127.0.0.1:6380/0", "RedisBackend", "aqueue.result.redis"),
    ],
)
def test_backend_repr_names_kind_and_masks_password(
    make_app: MakeApp, url: str, kind: str, module: str | None
) -> None:
    # Given an app whose backend URL has a password (nothing connects)
    app = make_app(backend=url)
    result = app.AsyncResult("some-id")
    # When the backend is printed, then the kind and the URL show, the password does not
    for text in (str(result.backend), repr(result.backend)):
        assert kind in text
        assert "s3cret" not in text
        assert "127.0.0.1" in text or "tour" in text
    assert result.backend is app.backend


def test_broker_repr_masks_password(make_app: MakeApp) -> None:
    app = make_app(broker="amqp://guest:s3cret@127.0.0.1:5672//")
    assert "s3cret" not in str(app.broker)
    assert "guest" in str(app.broker)


# Rows: app.conf ---------------------------------------------------------------------------------


def test_conf_attribute_assignment(make_app: MakeApp) -> None:
    app = make_app()
    # When a setting is assigned, then it reads back
    app.conf.task_serializer = "json"
    assert app.conf.task_serializer == "json"


def test_conf_update_with_the_tour_values(make_app: MakeApp) -> None:
    app = make_app()
    # When the tour's settings are updated at once
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        timezone="Europe/Oslo",
        enable_utc=True,
    )
    # Then each one reads back
    conf = app.conf
    assert (conf.task_serializer, conf.accept_content, conf.result_serializer) == ("json", ["json"], "json")
    assert (conf.timezone, conf.enable_utc) == ("Europe/Oslo", True)


def test_unknown_setting_suggests_the_closest_one(make_app: MakeApp) -> None:
    app = make_app()
    # When a misspelt setting is updated, then the error names the closest setting, and nothing changes
    with pytest.raises(UnknownSetting, match="task_serializer"):
        app.conf.update(task_serializer="msgpack", task_serialiser="json")
    assert app.conf.task_serializer == "json"
    # When it is assigned as an attribute, then the same
    with pytest.raises(UnknownSetting, match="Did you mean 'result_backend'"):
        app.conf.result_backends = "memory://"
    # And App() keyword settings are checked the same way
    with pytest.raises(UnknownSetting, match="task_routes"):
        App("tasks", broker="memory://", task_route={})


_CELERYCONFIG = """\
from datetime import timedelta
import os

broker_url = 'memory://celeryconfig'
result_backend = 'memory://celeryconfig'

task_serializer = 'json'
result_serializer = 'json'
accept_content = ['json']
timezone = 'Europe/Oslo'
enable_utc = True
result_expires = timedelta(hours=1)
task_routes = {'tasks.add': 'low-priority'}
task_annotations = {'tasks.add': {'rate_limit': '10/m'}}

if __name__ == '__main__':
    print(os.path.basename(__file__))
"""


@pytest.fixture
def celeryconfig(tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A ``celeryconfig`` module, as the tour writes it, importable under a unique name."""
    name = f"celeryconfig_{unique}"
    (tmp_path / f"{name}.py").write_text(_CELERYCONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _check_celeryconfig(app: App) -> None:
    conf = app.conf
    assert (conf.broker_url, conf.result_backend) == ("memory://celeryconfig", "memory://celeryconfig")
    assert (conf.timezone, conf.enable_utc, conf.result_expires) == ("Europe/Oslo", True, 3600.0)
    assert conf.task_routes == {"tasks.add": "low-priority"}
    assert app.annotation("tasks.add") == {"rate_limit": "10/m"}


def test_config_from_object_by_module_name_module_and_object(make_app: MakeApp, celeryconfig: str) -> None:
    # By module name
    by_name = make_app()
    by_name.config_from_object(celeryconfig)
    _check_celeryconfig(by_name)
    # By module
    by_module = make_app()
    by_module.config_from_object(importlib.import_module(celeryconfig))
    _check_celeryconfig(by_module)
    # As App(config_source=...)
    _check_celeryconfig(App("tasks", config_source=celeryconfig))

    # By object: a class, as Celery allows, an instance, and a namespace
    class Config:
        task_serializer = "json"
        timezone = "Europe/Oslo"
        task_default_queue = "from-object"

    for obj in (Config, Config(), SimpleNamespace(timezone="Europe/Oslo", task_default_queue="from-object")):
        app = make_app()
        app.config_from_object(obj)
        assert (app.conf.timezone, app.conf.task_default_queue) == ("Europe/Oslo", "from-object")


def test_celeryconfig_runs_as_a_script(celeryconfig: str, tmp_path: Path) -> None:
    # Given the tour's `python -m celeryconfig` check, then the module runs unchanged
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", celeryconfig], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{celeryconfig}.py"


# Row: task_routes -------------------------------------------------------------------------------


async def test_task_routes_send_to_the_routed_queue_where_it_waits_for_its_worker(
    app: App, unique: str
) -> None:
    low = f"low-priority-{unique}"
    app.conf.task_routes = {"tasks.add": low}
    add = register_add(app)
    try:
        async with app:
            # Given a worker of the default queue only
            async with worker(app):
                # When tasks.add is sent
                result = await add.delay(4, 4)
                # Then that worker does not run it
                with pytest.raises(AqueueTimeoutError):
                    await result.get(timeout=0.5)
            # And the message waits in the routed queue
            async with app.broker.consume([low], 1) as consumer:
                with anyio.fail_after(WAIT):
                    delivery = await consumer.receive()
                assert (delivery.id, delivery.queue) == (result.id, low)
                await delivery.requeue()
            # When a worker of that queue starts, then it runs it
            async with worker(app, low):
                assert await result.get(timeout=WAIT) == 8
                # And later sends go there too
                assert await add.delay(1, 2).get(timeout=WAIT) == 3
    finally:
        if isinstance(app.broker, AMQPBroker):
            await app.broker.delete_queue(low)
        else:
            await app.broker.purge(low)


# Row: task_annotations rate_limit ---------------------------------------------------------------


async def test_task_annotations_rate_limit_spaces_task_starts(app: App) -> None:
    # Given a rate of 120/m (one every half second) set through task_annotations
    app.conf.task_annotations = {"tasks.add": {"rate_limit": "120/m"}}
    starts: list[float] = []

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        starts.append(time.monotonic())
        return x + y

    async with app, worker(app):
        # When three are sent at once
        results = [add.delay(i, i) for i in range(3)]
        for result in results:
            await result.get(timeout=WAIT)
    # Then one ran at once and each next one about half a second later
    starts.sort()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.45 for gap in gaps), gaps


async def test_control_rate_limit_replies_per_worker_and_applies(app: App) -> None:
    add = register_add(app)
    async with app, worker(app) as running:
        # When the rate limit is changed through remote control
        replies = await app.control.rate_limit(
            "tasks.add", "10/m", destination=[running.hostname], timeout=WAIT
        )
        # Then the worker replies as Celery's does, and the new rate is in force
        assert replies == [{running.hostname: {"ok": "new rate limit set successfully"}}]
        assert str(running.runtimes["tasks.add"].bucket.rate) == "10/m"
        # And tasks still run (the bucket starts full)
        assert await add.delay(1, 1).get(timeout=WAIT) == 2


# Rows: ignore_result, task_ignore_result, no backend --------------------------------------------


async def test_ignore_result_get_raises_result_not_stored_at_once(app: App) -> None:
    ran = anyio.Event()

    @app.task(ignore_result=True)
    async def fire() -> int:
        ran.set()
        return 1

    async with app, worker(app):
        result = fire.delay()
        # When get() is called, then it says at once why it cannot return
        with anyio.fail_after(1), pytest.raises(ResultNotStored, match="ignore_result"):
            await result.get()
        # And once the task ran, nothing was stored
        with anyio.fail_after(WAIT):
            await ran.wait()
            await result
        await anyio.sleep(0.1)
        assert await app.AsyncResult(result.id).refresh() == states.PENDING


async def test_task_ignore_result_setting_and_per_call_option(
    make_app: MakeApp, transport: Transport
) -> None:
    app = make_app(transport, task_ignore_result=True)
    add = register_add(app)
    async with app, worker(app):
        # Given task_ignore_result, when get() is called, then ResultNotStored is raised at once
        with anyio.fail_after(1), pytest.raises(ResultNotStored):
            await add.delay(1, 1).get()
    # And apply_async(ignore_result=True) ignores the result of a task that would store it
    app.conf.task_ignore_result = False
    async with app, worker(app):
        with anyio.fail_after(1), pytest.raises(ResultNotStored):
            await add.apply_async((2, 2), ignore_result=True).get()
        assert await add.apply_async((2, 2)).get(timeout=WAIT) == 4


async def test_no_backend_get_names_the_result_backend_setting(
    make_app: MakeApp, transport: Transport
) -> None:
    # Given an app with no result backend
    app = make_app(transport, backend=None)
    app.conf.result_backend = None
    ran = anyio.Event()

    @app.task
    async def work() -> int:
        ran.set()
        return 1

    async with app, worker(app):
        result = work.delay()
        # When get() is called, then the error names the missing setting
        with anyio.fail_after(WAIT), pytest.raises(NoResultBackend, match="result_backend"):
            await result.get()
        # And the task still runs
        with anyio.fail_after(WAIT):
            await ran.wait()


# Section 6: send_task, app.AsyncResult, async with app / aclose -------------------------------------


async def test_send_task_by_name_and_app_async_result(app: App) -> None:
    register_add(app)
    async with app, worker(app):
        # When a task is sent by name
        result = await app.send_task("tasks.add", args=[4, 4], kwargs={})
        # Then it returns an AsyncResult like delay
        assert isinstance(result, AsyncResult)
        assert await result.get(timeout=WAIT) == 8
        # And app.AsyncResult builds a handle for the same id
        again = app.AsyncResult(result.id)
        assert again == result and again.id == result.id
        assert await again.get(timeout=WAIT) == 8


async def test_async_with_app_and_aclose(app: App) -> None:
    add = register_add(app)
    # Given a send inside `async with app:` that nobody awaited
    async with app:
        pending = add.delay(4, 4)
    # Then leaving the block finished publishing it, and closed the connections
    with anyio.fail_after(WAIT):
        await pending
    # When the app is used again, it reconnects, and aclose() closes it again
    async with worker(app):
        assert await pending.get(timeout=WAIT) == 8
        assert await add.delay(1, 2).get(timeout=WAIT) == 3
    await app.aclose()


# Row: @app.task on a plain def ----------------------------------------------------------------------


async def test_sync_task_runs_in_a_worker_thread(app: App) -> None:
    loop_thread = threading.get_ident()

    @app.task
    def where(x: int) -> list[int]:
        return [x, threading.get_ident()]

    async with app, worker(app):
        value, thread = await where.delay(7).get(timeout=WAIT)
    assert value == 7
    assert thread != loop_thread


# Worker options: bind/retry, acks_late, countdown/eta, expires, time_limit, track_started ------------


async def test_bound_task_sees_its_request_and_retries(app: App) -> None:
    seen: list[tuple[str | None, int]] = []

    @app.task(bind=True)
    async def flaky(self: Any, x: int) -> int:
        seen.append((self.request.id, self.request.retries))
        if self.request.retries == 0:
            raise self.retry(countdown=0.1)
        return x * 2

    async with app, worker(app):
        result = flaky.delay(21)
        assert await result.get(timeout=WAIT) == 42
    # Then it ran twice under the same id, the second time as retry 1
    assert seen == [(result.id, 0), (result.id, 1)]


async def test_bound_sync_task_sees_its_request(app: App) -> None:
    @app.task(bind=True)
    def who(self: Any) -> str | None:
        return str(self.request.id)

    async with app, worker(app):
        result = who.delay()
        assert await result.get(timeout=WAIT) == result.id


async def test_acks_late_leaves_the_message_unacknowledged_while_running(app: App) -> None:
    started, release = anyio.Event(), anyio.Event()

    @app.task(acks_late=True)
    async def late() -> str:
        started.set()
        await release.wait()
        return "late"

    async with app, worker(app) as running:
        result = late.delay()
        with anyio.fail_after(WAIT):
            await started.wait()
        # While it runs, the worker still holds its delivery unsettled
        loop = running._loop
        assert loop is not None
        assert [d.id for d in loop.consumer.held.values()] == [result.id]
        release.set()
        assert await result.get(timeout=WAIT) == "late"
        await eventually(lambda: _true(not loop.consumer.held))


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("how", ["countdown", "eta"])
async def test_countdown_and_eta_do_not_run_early(app: App, how: str) -> None:
    @app.task
    async def stamp() -> float:
        return time.time()

    async with app, worker(app):
        sent = time.time()
        if how == "countdown":
            result = stamp.apply_async(countdown=0.6)
        else:
            result = stamp.apply_async(eta=datetime.now(UTC) + timedelta(seconds=0.6))
        ran = await result.get(timeout=WAIT)
    assert ran >= sent + 0.6 - 0.05


async def test_expired_task_is_revoked(app: App) -> None:
    ran: list[int] = []

    @app.task
    async def late() -> None:
        ran.append(1)

    async with app:
        # Given a task sent with an expiry that passes before any worker starts
        result = await late.apply_async(expires=0.05)
        await anyio.sleep(0.1)
        # When a worker receives it
        async with worker(app):
            # Then it is not run, and its state is REVOKED
            with pytest.raises(TaskRevokedError):
                await result.get(timeout=WAIT)
    assert result.state == states.REVOKED
    assert ran == []


async def test_time_limit_raises_time_limit_exceeded(app: App) -> None:
    @app.task(time_limit=0.2)
    async def forever() -> None:
        await anyio.sleep(30)

    async with app, worker(app):
        started = time.monotonic()
        with pytest.raises(TimeLimitExceeded, match="time limit"):
            await forever.delay().get(timeout=WAIT)
        assert time.monotonic() - started < WAIT


async def test_track_started_shows_started_while_running(app: App) -> None:
    release = anyio.Event()

    @app.task(track_started=True)
    async def slow() -> int:
        await release.wait()
        return 1

    async with app, worker(app):
        result = slow.delay()
        # While it runs, its state is STARTED
        await eventually(lambda: _is(result, states.STARTED))
        assert not await result.ready()
        release.set()
        assert await result.get(timeout=WAIT) == 1
        assert result.state == states.SUCCESS


async def _is(result: AsyncResult[Any], state: str) -> bool:
    return await result.refresh() == state


# Delivery guarantees: messages that must never run -------------------------------------------------


async def test_unregistered_task_is_logged_not_run_and_the_worker_goes_on(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    add = register_add(app)
    caplog.set_level(logging.ERROR, logger="aqueue")
    async with app, worker(app):
        # When a task this worker does not know is sent by name
        unknown = app.send_task("tasks.nowhere", args=[1])
        # Then get() raises NotRegistered naming it
        with pytest.raises(NotRegistered, match=r"tasks\.nowhere"):
            await unknown.get(timeout=WAIT)
        # And the worker keeps running tasks
        assert await add.delay(4, 4).get(timeout=WAIT) == 8
    # And the error was logged with the task id
    assert any(unknown.id in r.getMessage() and "tasks.nowhere" in r.getMessage() for r in caplog.records)


class _Touch:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch, (str(self.path),))


def _touch(path: str) -> None:
    Path(path).touch()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\x00\xffnot a message\x9c", "application/json"),
        (b'{"no": "task"}', "application/json"),
        (None, "application/x-python-serialize"),
    ],
    ids=["garbage", "not-a-task", "pickle"],
)
async def test_bad_messages_are_logged_not_run_and_the_worker_goes_on(
    app: App,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    body: bytes | None,
    content_type: str,
) -> None:
    add = register_add(app)
    trap = tmp_path / "unpickled"
    payload = body if body is not None else pickle.dumps(_Touch(trap))
    caplog.set_level(logging.ERROR, logger="aqueue")
    bad_id = str(uuid.uuid4())
    async with app:
        # Given a bad message put straight into the queue
        await app.broker.publish([Envelope(bad_id, app.conf.task_default_queue, payload, content_type)])
        # When a worker consumes it, followed by a good task
        async with worker(app):
            assert await add.delay(4, 4).get(timeout=WAIT) == 8
    # Then the bad one was logged with its id, and a pickle was never loaded
    assert any(bad_id in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not trap.exists()


# Errors raised where things are declared -----------------------------------------------------------


async def test_unserializable_argument_raises_encode_error_at_delay(make_app: MakeApp) -> None:
    app = make_app()
    add = register_add(app)
    # When an argument cannot be encoded, then delay() raises at once, naming it and the serializer
    with pytest.raises(EncodeError, match=r"positional argument 1 \(object\).*json"):
        add.delay(1, object())
    with socket.socket() as sock, pytest.raises(EncodeError, match=r"keyword argument 'y' \(socket\).*json"):
        add.delay(1, y=sock)
    app.conf.task_serializer = "pickle"
    with socket.socket() as sock, pytest.raises(EncodeError, match=r"positional argument 0.*pickle"):
        add.delay(sock, 1)
    # And EncodeError is also a TypeError, as with Celery's kombu
    assert issubclass(EncodeError, TypeError)


def test_bad_rate_raises_invalid_rate_quoting_it(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.raises(InvalidRate, match="'10/x'"):

        @app.task(rate_limit="10/x")
        async def limited() -> None: ...


async def test_bad_rate_in_control_raises_before_sending(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.raises(InvalidRate, match="'fast'"):
        await app.control.rate_limit("tasks.add", "fast")


async def test_bad_url_scheme_raises_invalid_url(make_app: MakeApp) -> None:
    # Given URLs with schemes aqueue does not know
    app = make_app(broker="kafka://127.0.0.1:9092", backend="mongodb://127.0.0.1")
    # When the broker or backend is used, then InvalidURL names the scheme and the choices
    with pytest.raises(InvalidURL, match=r"'kafka'.*amqp://"):
        _ = app.broker
    with pytest.raises(InvalidURL, match=r"'mongodb'.*redis://"):
        _ = app.backend
    with pytest.raises(InvalidURL):
        await app.connect()


# Graceful shutdown ---------------------------------------------------------------------------------


async def test_running_task_finishes_during_worker_exit(app: App) -> None:
    started = anyio.Event()

    @app.task
    async def slow() -> str:
        started.set()
        await anyio.sleep(0.3)
        return "finished"

    async with app:
        async with worker(app, shutdown_timeout=WAIT):
            result = slow.delay()
            with anyio.fail_after(WAIT):
                await started.wait()
        # When the worker block exits while the task runs, then the task finished first
        assert await result.get(timeout=WAIT) == "finished"


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks_late", "early_ack"])
async def test_task_past_the_shutdown_timeout_is_requeued_and_runs_again(app: App, acks_late: bool) -> None:
    attempts: list[bool] = []
    started = anyio.Event()

    @app.task(acks_late=acks_late)
    async def long() -> int:
        attempts.append(True)
        started.set()
        if len(attempts) == 1:
            await anyio.sleep(30)
        return len(attempts)

    async with app:
        # Given a worker with a short grace period, running a long task
        async with worker(app, shutdown_timeout=0.1):
            result = long.delay()
            with anyio.fail_after(WAIT):
                await started.wait()
        # When the worker has stopped, the task is back in the queue; a new worker runs it again
        async with worker(app):
            assert await result.get(timeout=WAIT) == 2
