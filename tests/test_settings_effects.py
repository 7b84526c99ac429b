"""Settings whose effect is not covered elsewhere: zones, include, acks on failure, inert Celery names."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from aqueue import App
from aqueue.exceptions import ImproperlyConfigured
from aqueue.worker import Worker

MakeApp = Callable[..., App]


def test_unknown_timezone_is_refused_with_what_to_use(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.raises(ImproperlyConfigured, match="IANA"):
        app.conf.timezone = "Mars/Olympus"


def test_naive_eta_is_utc_by_default_and_in_timezone_when_enable_utc_is_off(make_app: MakeApp) -> None:
    # Given a naive datetime one hour ahead in UTC terms
    naive = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)
    app = make_app(timezone="Asia/Tokyo")
    # Then with enable_utc (the default) it is read as UTC
    assert app.conf.zone() is UTC
    # And with enable_utc off it is read in the app's zone
    app.conf.enable_utc = False
    assert app.conf.zone() == ZoneInfo("Asia/Tokyo")
    expected = naive.replace(tzinfo=ZoneInfo("Asia/Tokyo")).timestamp()
    from aqueue.options import _moment

    assert _moment(naive, app.conf, "eta", relative=False) == pytest.approx(expected)
    assert abs(expected - (time.time() + 3600)) > 3600  # Tokyo is not UTC: the zone did change the time


def test_setting_an_inert_celery_setting_says_it_has_no_effect(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    with caplog.at_level(logging.WARNING, logger="aqueue"):
        app.conf.task_reject_on_worker_lost = True
    assert "task_reject_on_worker_lost" in caplog.text
    assert "no effect" in caplog.text


async def test_worker_imports_the_include_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    # Given an app naming in include a module that registers a task on it when imported
    (tmp_path / f"app_{unique}.py").write_text(
        "from aqueue import App\n"
        f"app = App('inc', broker='memory://{unique}', backend='memory://{unique}', include=['tasks_{unique}'])\n"
    )
    (tmp_path / f"tasks_{unique}.py").write_text(
        f"from app_{unique} import app\n@app.task(name='included.double')\nasync def double(x):\n    return 2 * x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = importlib.import_module(f"app_{unique}").app
    assert "included.double" not in app.tasks
    # When a worker starts; Then the task is registered and runs
    async with app, Worker(app, concurrency=2):
        assert await app.send_task("included.double", [21]).get(timeout=5) == 42


def test_a_module_in_include_that_cannot_be_imported_is_named(make_app: MakeApp) -> None:
    app = make_app(include=["no_such_module_here"])
    with pytest.raises(ImproperlyConfigured, match="no_such_module_here"):
        app.import_modules()


async def test_acks_on_failure_off_dead_letters_a_failed_late_ack_task(make_app: MakeApp) -> None:
    # Given late acks and task_acks_on_failure_or_timeout off
    app = make_app(task_acks_late=True, task_acks_on_failure_or_timeout=False)

    @app.task
    async def broken() -> None:
        raise ValueError("no")

    async with app, Worker(app, concurrency=1):
        result = broken.delay()
        with pytest.raises(ValueError):
            await result.get(timeout=5)
        with anyio.fail_after(5):
            while not await app.broker.dead_letters(app.conf.task_default_queue):
                await anyio.sleep(0.01)
        # Then the failed message was dead-lettered instead of acknowledged
        assert [e.id for e in await app.broker.dead_letters(app.conf.task_default_queue)] == [result.id]


async def test_limits_a_thread_cannot_honour_are_reported_at_worker_start(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.task(soft_time_limit=1)
    async def soft() -> None: ...

    @app.task(time_limit=1)
    def threaded() -> None: ...

    with caplog.at_level(logging.WARNING, logger="aqueue.worker"):
        async with app, Worker(app, concurrency=1):
            pass
    # Then only the thread's limit is reported: an async def task honours both
    assert f"Task {threaded.name}: a plain def task runs in a thread" in caplog.text
    assert soft.name not in caplog.text


def test_global_rate_limit_on_a_broker_without_a_shared_store_says_what_to_use() -> None:
    from aqueue.worker.execution import TaskRuntime

    app = App("tasks", broker="amqp://guest:guest@127.0.0.1:5672//")

    @app.task(global_rate_limit="100/s")
    async def limited() -> None: ...

    # When the worker works out the task's settings (before connecting); Then it refuses, saying what to use
    with pytest.raises(ImproperlyConfigured, match="redis://"):
        TaskRuntime.build(app, limited)


def test_bad_global_rate_is_refused_where_the_task_is_declared() -> None:
    from aqueue.exceptions import InvalidRate

    app = App("tasks", broker="memory://")
    with pytest.raises(InvalidRate, match="'100/x'"):

        @app.task(global_rate_limit="100/x")
        async def limited() -> None: ...
