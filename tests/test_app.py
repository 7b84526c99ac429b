"""App: task registry and naming, send_task's message and routing, settings in force, connections."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from aqueue import App, Task
from aqueue.broker import Delivery
from aqueue.exceptions import (
    AqueueError,
    ImproperlyConfigured,
    InvalidRate,
    OperationalError,
    ResultNotStored,
)
from aqueue.message import Message, decode_message
from aqueue.result.disabled import DisabledBackend
from aqueue.result.memory import MemoryBackend
from aqueue.serialization import accepted_content_types

MakeApp = Callable[..., App]
ALL_CONTENT = accepted_content_types(["json", "msgpack", "pickle"])


async def sent(app: App, queue: str | None = None) -> tuple[Delivery, Message]:
    """The next message waiting in ``queue`` (default: the app's default queue), acknowledged."""
    async with app.broker.consume([queue or app.conf.task_default_queue], 1) as consumer:
        with anyio.fail_after(5):
            delivery = await consumer.receive()
        await delivery.ack()
    return delivery, decode_message(delivery.body, delivery.content_type, ALL_CONTENT)


# Registry -----------------------------------------------------------------------------------------


def test_task_names_follow_celery(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="custom.name")
    def other() -> None: ...

    # Then a task is named module.function, or as given, and registered under that name
    assert add.name == f"{__name__}.add"
    assert app.tasks == {add.name: add, "custom.name": other}
    assert isinstance(add, Task) and add.app is app
    assert repr(add) == f"<@task: {add.name} of tasks>"


def test_tasks_defined_in_main_are_named_after_the_app(make_app: MakeApp) -> None:
    def job() -> None: ...

    job.__module__ = "__main__"
    assert make_app().gen_task_name(job) == "tasks.job"
    assert App(broker="memory://").gen_task_name(job) == "__main__.job"


def test_unknown_task_option_lists_the_known_ones(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.raises(ImproperlyConfigured, match=r"Unknown task option.*rate_limit"):
        app.task(rate_limt="10/m")  # type: ignore[call-overload]


def test_bad_rate_limit_option_raises_at_decoration(make_app: MakeApp) -> None:
    with pytest.raises(InvalidRate, match="'often'"):
        make_app().task(rate_limit="often")


def test_annotations_merge_star_then_name_over_lists(make_app: MakeApp) -> None:
    app = make_app()
    assert app.annotation("tasks.add") == {}
    app.conf.task_annotations = [
        {"*": {"rate_limit": "1/s", "acks_late": True}},
        {"tasks.add": {"rate_limit": "10/m"}},
    ]
    assert app.annotation("tasks.add") == {"rate_limit": "10/m", "acks_late": True}
    assert app.annotation("tasks.mul") == {"rate_limit": "1/s", "acks_late": True}


# Sending ------------------------------------------------------------------------------------------


async def test_delay_publishes_the_call_to_the_default_queue(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with app:
        # When a task is sent
        result = await add.delay(4, y=4)
        # Then its message is in the default queue, as JSON, with the call
        delivery, message = await sent(app)
    assert (delivery.id, delivery.queue, delivery.content_type) == (
        result.id,
        app.conf.task_default_queue,
        "application/json",
    )
    assert (message.id, message.task, list(message.args), message.kwargs) == (
        result.id,
        "tasks.add",
        [4],
        {"y": 4},
    )
    assert (message.eta, message.expires, message.retries, message.ignore_result) == (None, None, 0, False)
    assert result.task_name == "tasks.add"


async def test_apply_async_options_reach_the_message(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def job() -> None: ...

    async with app:
        # Given a countdown, an expiry in seconds, headers and a task id
        before = time.time()
        result = await job.apply_async(countdown=0.01, expires=60, headers={"trace": "t1"}, task_id="my-id")
        await anyio.sleep(0.02)
        _, message = await sent(app)
    # Then the message carries them, with times as unix times
    assert result.id == message.id == "my-id"
    assert message.eta is not None and before + 0.01 <= message.eta <= time.time()
    assert message.expires is not None and before + 60 <= message.expires <= time.time() + 60
    assert message.headers == {"trace": "t1"}


async def test_eta_and_expires_as_datetimes(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def job() -> None: ...

    eta = datetime.now(UTC) - timedelta(seconds=1)
    expires = datetime.now(UTC) + timedelta(hours=1)
    async with app:
        await job.apply_async(eta=eta, expires=expires)
        _, message = await sent(app)
    assert (message.eta, message.expires) == (eta.timestamp(), expires.timestamp())


async def test_queue_precedence(make_app: MakeApp, unique: str) -> None:
    # Given a task with its own queue and a route for it
    app = make_app(task_routes={"tasks.routed": f"routed-{unique}"})

    @app.task(name="tasks.routed", queue=f"own-{unique}")
    async def routed() -> None: ...

    @app.task(name="tasks.own", queue=f"own-{unique}")
    async def own() -> None: ...

    async with app:
        # Then an explicit queue wins, then task_routes, then the task's queue
        await routed.apply_async(queue=f"explicit-{unique}")
        await routed.delay()
        await own.delay()
        assert (await sent(app, f"explicit-{unique}"))[1].task == "tasks.routed"
        assert (await sent(app, f"routed-{unique}"))[1].task == "tasks.routed"
        assert (await sent(app, f"own-{unique}"))[1].task == "tasks.own"


async def test_changing_settings_after_sending_applies_to_later_sends(make_app: MakeApp, unique: str) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add() -> None: ...

    async with app:
        await add.delay()
        assert (await sent(app))[0].content_type == "application/json"
        # When routes and serializer change
        app.conf.task_routes = {"tasks.add": f"later-{unique}"}
        app.conf.task_serializer = "msgpack"
        await add.delay()
        # Then the next send follows them
        delivery, message = await sent(app, f"later-{unique}")
    assert delivery.content_type == "application/x-msgpack" and message.task == "tasks.add"


async def test_serializer_from_task_annotation_and_call(make_app: MakeApp) -> None:
    app = make_app(task_annotations={"tasks.b": {"serializer": "msgpack"}})

    @app.task(name="tasks.a", serializer="pickle")
    async def a() -> None: ...

    @app.task(name="tasks.b")
    async def b() -> None: ...

    async with app:
        await a.delay()
        assert (await sent(app))[0].content_type == "application/x-python-serialize"
        await b.delay()
        assert (await sent(app))[0].content_type == "application/x-msgpack"
        await b.apply_async(serializer="json")
        assert (await sent(app))[0].content_type == "application/json"


async def test_send_task_for_a_task_not_registered_here(make_app: MakeApp) -> None:
    app = make_app()
    async with app:
        result = await app.send_task("elsewhere.job", args=(1,), kwargs={"k": 2})
        _, message = await sent(app)
    assert (message.id, message.task, list(message.args), message.kwargs) == (
        result.id,
        "elsewhere.job",
        [1],
        {"k": 2},
    )


def test_delay_outside_an_event_loop_says_to_use_one(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def job() -> None: ...

    with pytest.raises(AqueueError, match="running event loop"):
        job.delay()


# Settings in force ---------------------------------------------------------------------------------


def test_broker_falls_back_to_the_environment_then_the_embedded_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AQUEUE_BROKER_URL", raising=False)
    assert App().broker_url == "sqlite:///aqueue.db"
    monkeypatch.setenv("AQUEUE_BROKER_URL", "memory://from-env")
    assert App().broker_url == "memory://from-env"
    assert App(broker="memory://explicit").broker_url == "memory://explicit"


def test_backend_is_disabled_without_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AQUEUE_RESULT_BACKEND", raising=False)
    app = App(broker="memory://")
    assert isinstance(app.backend, DisabledBackend)
    assert "result_backend" in repr(app.backend) or "no result_backend" in repr(app.backend)
    monkeypatch.setenv("AQUEUE_RESULT_BACKEND", "memory://from-env")
    assert isinstance(App(broker="memory://").backend, MemoryBackend)


def test_settings_as_keywords_and_config_source(make_app: MakeApp) -> None:
    class Config:
        task_default_queue = "from-source"
        task_serializer = "msgpack"

    app = App("tasks", broker="memory://", config_source=Config, task_serializer="json")
    # Keywords are applied after the config source
    assert (app.conf.task_default_queue, app.conf.task_serializer) == ("from-source", "json")
    assert repr(app).startswith("<App tasks at 0x")


# Connections -------------------------------------------------------------------------------------


async def test_aclose_finishes_pending_publishes_and_the_app_reconnects(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def job() -> None: ...

    # Given sends nobody awaited
    results = [job.delay() for _ in range(3)]
    # When the app is closed
    await app.aclose()
    # Then they were all published
    for result in results:
        with anyio.fail_after(1):
            await result
    # And the app connects again on next use
    async with app:
        await job.delay()
        ids = {(await sent(app))[1].id for _ in range(4)}
    assert {r.id for r in results} < ids


async def test_publish_to_an_unreachable_broker_retries_then_raises(make_app: MakeApp, tmp_path: Any) -> None:
    # Given a broker that cannot be opened (its directory cannot be created)
    blocker = tmp_path / "file"
    blocker.write_text("")
    app = make_app(
        broker=f"sqlite:///{blocker}/sub/q.db",
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.05,
            "interval_step": 0.05,
            "interval_max": 0.1,
        },
    )

    @app.task
    async def job() -> None: ...

    # When a task is sent, then awaiting the send raises after the retries
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(OperationalError):
        await job.delay()
    assert time.monotonic() - started >= 0.1


async def test_unreachable_redis_raises_in_well_under_a_minute(make_app: MakeApp) -> None:
    app = make_app(broker="redis://127.0.0.1:1/0")

    @app.task
    async def job() -> None: ...

    with anyio.fail_after(30), pytest.raises(OperationalError):
        await job.delay()


async def test_ignore_result_from_task_annotations_is_known_when_sending(make_app: MakeApp) -> None:
    # Given ignore_result set through task_annotations (which the worker applies)
    app = make_app(task_annotations={"tasks.quiet": {"ignore_result": True}})

    @app.task(name="tasks.quiet")
    async def quiet() -> None: ...

    @app.task(name="tasks.loud", ignore_result=False)
    async def loud() -> None: ...

    async with app:
        # Then get() on its result says at once why it cannot return, instead of waiting
        with anyio.fail_after(1), pytest.raises(ResultNotStored):
            await quiet.delay().get()
        # And the task's own option still wins over the annotation
        app.conf.task_annotations = {"*": {"ignore_result": True}}
        assert not loud.delay().ignored
