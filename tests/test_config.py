"""Settings: Celery's names and defaults, validated on assignment; unknown names suggest the closest."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest

from aqueue.config import DEFAULT_BROKER_URL, Settings
from aqueue.exceptions import ImproperlyConfigured, InvalidRate, UnknownSetting


def test_defaults_are_celerys() -> None:
    conf = Settings()
    assert (conf.task_default_queue, conf.task_serializer, conf.result_serializer) == (
        "celery",
        "json",
        "json",
    )
    assert conf.accept_content == ["json"]
    assert (conf.broker_url, conf.result_backend) == (None, None)
    assert (conf.task_acks_late, conf.task_ignore_result, conf.task_track_started) == (False, False, False)
    assert (conf.worker_prefetch_multiplier, conf.result_expires) == (4, 86400.0)
    assert conf.task_default_retry_delay == 180.0
    assert conf.control_exchange == "celery"
    assert DEFAULT_BROKER_URL == "sqlite:///aqueue.db"


def test_assignment_and_update_set_values_and_tell_listeners() -> None:
    conf = Settings()
    changes: list[None] = []
    conf.on_change(lambda: changes.append(None))
    # When settings are assigned, updated from a mapping, from keywords, and by item
    conf.task_serializer = "msgpack"
    conf.update({"timezone": "Europe/Oslo"}, enable_utc=False)
    conf["task_default_queue"] = "low"
    # Then they read back, by attribute, by item and with get()
    assert conf.task_serializer == "msgpack"
    assert (conf["timezone"], conf.get("enable_utc")) == ("Europe/Oslo", False)
    assert conf.task_default_queue == "low"
    assert conf.get("not_a_setting", "fallback") == "fallback"
    # And every change was announced (so cached routes and serializers are recomputed)
    assert len(changes) == 4


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("task_serialiser", "task_serializer"),
        ("broker", "broker_url"),
        ("result_backends", "result_backend"),
        ("CELERY_TASK_SERIALIZER", None),
    ],
)
def test_unknown_names_suggest_the_closest(name: str, closest: str | None) -> None:
    conf = Settings()
    for attempt in (lambda: conf.update({name: 1}), lambda: setattr(conf, name, 1), lambda: conf[name]):
        with pytest.raises(UnknownSetting) as raised:
            attempt()
        assert raised.value.name == name
        assert raised.value.suggestion == closest
        assert f"Unknown setting {name!r}" in str(raised.value)
        if closest:
            assert f"Did you mean {closest!r}?" in str(raised.value)
        # And it is an AttributeError, so getattr(conf, name, default) keeps working
        assert isinstance(raised.value, AttributeError)


def test_update_checks_every_name_before_setting_any() -> None:
    conf = Settings()
    with pytest.raises(UnknownSetting):
        conf.update(task_serializer="msgpack", task_serialiser="json")
    assert conf.task_serializer == "json"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("worker_concurrency", 0, "must be at least 1"),
        ("worker_prefetch_multiplier", -1, "must be at least 1"),
        ("task_serializer", "yaml", "Unknown serializer 'yaml'"),
        ("accept_content", ["json", "yaml"], "Unknown serializer 'yaml'"),
        ("accept_content", "json", "valid list"),
        ("task_acks_late", "maybe", "valid boolean"),
    ],
)
def test_invalid_values_are_refused_naming_the_setting(name: str, value: object, says: str) -> None:
    conf = Settings()
    before = getattr(conf, name)
    with pytest.raises(ImproperlyConfigured) as raised:
        setattr(conf, name, value)
    assert f"setting {name!r}" in str(raised.value)
    assert says in str(raised.value)
    assert getattr(conf, name) == before


def test_a_bad_default_rate_limit_raises_invalid_rate_quoting_it() -> None:
    with pytest.raises(InvalidRate, match="'10/x'"):
        Settings().task_default_rate_limit = "10/x"


def test_durations_accept_timedelta_as_seconds() -> None:
    conf = Settings()
    conf.update(result_expires=timedelta(hours=1), task_time_limit=timedelta(seconds=90))
    assert (conf.result_expires, conf.task_time_limit) == (3600.0, 90.0)


def test_config_from_object_takes_lowercase_non_callable_attributes() -> None:
    # Given an object with settings, helpers, constants and private names
    def helper() -> None: ...

    obj = SimpleNamespace(
        task_serializer="msgpack",
        task_routes={"tasks.add": "low"},
        helper=helper,
        timedelta=timedelta,
        OLD_STYLE="ignored",
        _private="ignored",
    )
    conf = Settings()
    # When it is loaded, then only the settings are taken
    conf.config_from_object(obj)
    assert (conf.task_serializer, conf.task_routes) == ("msgpack", {"tasks.add": "low"})


def test_config_from_object_accepts_a_mapping() -> None:
    conf = Settings()
    conf.config_from_object({"task_default_queue": "from-dict"})
    assert conf.task_default_queue == "from-dict"


def test_config_from_object_unknown_setting_is_an_error() -> None:
    with pytest.raises(UnknownSetting, match="task_serializer"):
        Settings().config_from_object(SimpleNamespace(task_serialiser="json"))


def test_config_from_a_module_that_cannot_be_imported() -> None:
    with pytest.raises(ImproperlyConfigured, match="'no_such_celeryconfig'"):
        Settings().config_from_object("no_such_celeryconfig")


def test_from_environment_fills_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given AQUEUE_* variables
    monkeypatch.setenv("AQUEUE_BROKER_URL", "memory://from-env")
    monkeypatch.setenv("AQUEUE_RESULT_BACKEND", "memory://from-env")
    # When the broker is set and the backend is not
    conf = Settings(broker_url="memory://explicit")
    conf.from_environment()
    # Then the setting wins, and the variable fills the gap
    assert (conf.broker_url, conf.result_backend) == ("memory://explicit", "memory://from-env")


def test_config_from_object_keeps_a_router_function_for_task_routes() -> None:
    # Given a configuration module whose task_routes is a router function, as Celery allows
    def route(name: str, args: object, kwargs: object, options: object, task: object) -> str:
        return "routed"

    conf = Settings()
    conf.config_from_object(SimpleNamespace(task_routes=route, helper=route))
    # Then the router is taken, and other functions are still skipped
    assert conf.task_routes is route
