"""Where each task option comes from: the call > the task > task_annotations > the setting > default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from aqueue import App
from aqueue.broker.memory import MemoryBroker
from aqueue.exceptions import ImproperlyConfigured, Retry
from aqueue.message import decode_message
from aqueue.options import NOT_GIVEN, OPTION_NAMES, TaskOptions, resolve
from aqueue.serialization import accepted_content_types
from aqueue.task import Context, _request
from aqueue.testing import running_worker
from aqueue.worker.execution import TaskRuntime

MakeApp = Callable[..., App]
ACCEPT = accepted_content_types(["json", "msgpack"])

# option: (setting, setting value, annotation value, task value); three distinct values each
LAYERED: dict[str, tuple[str, Any, Any, Any]] = {
    "ignore_result": ("task_ignore_result", True, False, True),
    "rate_limit": ("task_default_rate_limit", "1/s", "2/s", "3/s"),
    "global_rate_limit": ("task_default_global_rate_limit", "1/s", "2/s", "3/s"),
    "acks_late": ("task_acks_late", True, False, True),
    "acks_on_failure_or_timeout": ("task_acks_on_failure_or_timeout", False, True, False),
    "serializer": ("task_serializer", "msgpack", "json", "msgpack"),
    "default_retry_delay": ("task_default_retry_delay", 1.0, 2.0, 3.0),
    "time_limit": ("task_time_limit", 1.0, 2.0, 3.0),
    "soft_time_limit": ("task_soft_time_limit", 1.0, 2.0, 3.0),
    "track_started": ("task_track_started", True, False, True),
    "priority": ("task_default_priority", 1, 2, 3),
}
# options without a setting: (built-in default, annotation value, task value)
UNSET: dict[str, tuple[Any, Any, Any]] = {
    "queue": (None, "from-annotation", "from-task"),
    "max_retries": (3, 7, None),
    "expires": (None, 60.0, 120.0),
    "autoretry_for": ((), (KeyError,), (ValueError,)),
    "retry_kwargs": ({}, {"countdown": 1}, {"countdown": 2}),
    "retry_backoff": (False, 2, True),
    "retry_backoff_max": (600.0, 10.0, 20.0),
    "retry_jitter": (True, False, True),
}


def test_every_option_is_pinned_here() -> None:
    assert set(LAYERED) | set(UNSET) == set(OPTION_NAMES) == set(TaskOptions.__dataclass_fields__)


@pytest.mark.parametrize("name", sorted(LAYERED))
def test_the_task_beats_the_annotation_beats_the_setting(make_app: MakeApp, name: str) -> None:
    setting, from_setting, from_annotation, from_task = LAYERED[name]
    # Given only the setting
    app = make_app(**{setting: from_setting})
    assert getattr(resolve(TaskOptions(), {}, app.conf), name) == from_setting
    # When an annotation names the option, it wins over the setting
    assert getattr(resolve(TaskOptions(), {name: from_annotation}, app.conf), name) == from_annotation
    # And the task's own value wins over both
    own = TaskOptions.of({name: from_task})
    assert getattr(resolve(own, {name: from_annotation}, app.conf), name) == from_task


@pytest.mark.parametrize("name", sorted(UNSET))
def test_options_without_a_setting_fall_back_to_celerys_default(make_app: MakeApp, name: str) -> None:
    default, from_annotation, from_task = UNSET[name]
    conf = make_app().conf
    assert getattr(resolve(TaskOptions(), {}, conf), name) == default
    assert getattr(resolve(TaskOptions(), {name: from_annotation}, conf), name) == from_annotation
    assert (
        getattr(resolve(TaskOptions.of({name: from_task}), {name: from_annotation}, conf), name) == from_task
    )


def test_none_given_on_the_task_is_a_value_not_a_fallback(make_app: MakeApp) -> None:
    # Given max_retries=None (retry for ever) on the task and 5 in an annotation
    app = make_app(task_annotations={"tasks.job": {"max_retries": 5, "rate_limit": "1/s"}})

    @app.task(name="tasks.job", max_retries=None, rate_limit=None)
    async def job() -> None: ...

    # Then the task's None stands
    assert (job.resolved.max_retries, job.resolved.rate_limit) == (None, None)
    assert TaskOptions().max_retries is NOT_GIVEN


def test_annotations_by_name_beat_the_star_entry(make_app: MakeApp) -> None:
    app = make_app(task_annotations={"*": {"priority": 1}, "tasks.job": {"priority": 9}})
    assert app.options_for("tasks.job").priority == 9
    assert app.options_for("tasks.other").priority == 1


def test_a_bad_rate_in_an_annotation_is_an_error(make_app: MakeApp) -> None:
    app = make_app(task_annotations={"tasks.job": {"rate_limit": "fast"}})
    with pytest.raises(ImproperlyConfigured, match="fast"):
        app.options_for("tasks.job")


def test_an_unknown_task_option_lists_the_known_ones(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.raises(ImproperlyConfigured, match=r"max_retry.*use ignore_result"):
        app.task(max_retry=3)  # type: ignore[call-overload]


def test_a_settings_change_is_seen_by_the_next_resolution(make_app: MakeApp) -> None:
    app = make_app()
    assert app.options_for("tasks.job").acks_late is False
    app.conf.task_acks_late = True
    assert app.options_for("tasks.job").acks_late is True


def test_the_worker_applies_the_same_resolution(make_app: MakeApp) -> None:
    # Given options coming from each layer
    app = make_app(
        task_time_limit=5.0, task_annotations={"tasks.job": {"acks_late": True, "rate_limit": "2/s"}}
    )

    @app.task(name="tasks.job", track_started=True)
    async def job() -> None: ...

    # Then the worker's runtime holds exactly what the resolver says
    runtime = TaskRuntime.build(app, job)
    assert (runtime.acks_late, runtime.track_started, runtime.time_limit) == (True, True, 5.0)
    assert runtime.bucket.rate is not None and runtime.bucket.rate.per_second == 2
    assert runtime.options is job.resolved


def _in_request(**fields: Any) -> Any:
    return _request.set(Context(called_directly=False, **fields))


def test_retry_reads_max_retries_and_delay_from_annotations(make_app: MakeApp) -> None:
    # Given max_retries and default_retry_delay set only by an annotation
    app = make_app(task_annotations={"tasks.job": {"max_retries": 1, "default_retry_delay": 7.0}})

    @app.task(name="tasks.job")
    async def job() -> None: ...

    token = _in_request(id="x", retries=0)
    try:
        # Then the first retry waits the annotated delay
        with pytest.raises(Retry) as raised:
            job.retry()
        assert raised.value.when == 7.0
    finally:
        _request.reset(token)
    token = _in_request(id="x", retries=1)
    try:
        # And the annotated limit stops the second
        with pytest.raises(Exception, match="Can't retry"):
            job.retry()
    finally:
        _request.reset(token)


async def test_call_options_beat_the_task(make_app: MakeApp) -> None:
    # Given a task with its own priority and serializer
    app = make_app()

    @app.task(priority=3, serializer="msgpack", queue="own")
    async def job() -> None: ...

    # When sent with call options
    await job.apply_async(priority=9, serializer="json", queue="called", time_limit=4.0, expires=60)
    await job.apply_async()
    store = MemoryBroker(app.broker_url).store
    called, plain = store.queues["called"][0][0], store.queues["own"][0][0]
    # Then the call's values are on the first envelope, the task's on the second
    assert (called.priority, called.content_type, plain.priority, plain.content_type) == (
        9,
        "application/json",
        3,
        "application/x-msgpack",
    )
    message = decode_message(called.body, called.content_type, ACCEPT)
    assert message.time_limit == 4.0 and message.expires is not None


async def test_an_unknown_call_option_names_the_closest(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def job() -> None: ...

    with pytest.raises(ImproperlyConfigured, match=r"'countdwn'.*'countdown'"):
        job.apply_async(countdwn=3)  # type: ignore[call-arg]
    await job.apply_async(retry=True, exchange="x", routing_key="y")  # Celery's, accepted as inert


async def test_a_retry_keeps_the_priority_and_the_workflow_fields(make_app: MakeApp) -> None:
    # Given a task that retries once, sent with a priority, as a member of a group with a callback
    app = make_app()
    seen: list[tuple[int, int | None, str | None, list[Any] | None]] = []

    @app.task(bind=True)
    async def flaky(self: Any) -> str:
        request = self.request
        seen.append((request.retries, request.delivery_info["priority"], request.group, request.callbacks))
        if request.retries == 0:
            raise self.retry(countdown=0)
        return "done"

    link = {"task": "tasks.cb", "args": [], "kwargs": {}, "options": {}}
    async with running_worker(app):
        result = flaky.apply_async(priority=5, group_id="g1", group_index=0, link=link)
        assert await result.get(timeout=10) == "done"
    # Then the retried copy carried them all
    assert seen == [(0, 5, "g1", [link]), (1, 5, "g1", [link])]
