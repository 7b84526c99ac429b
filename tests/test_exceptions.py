"""The exception tree: one root, Celery's names, builtin bases where callers expect them, useful fields."""

from __future__ import annotations

import builtins

import pytest

from aqueue import exceptions as exc


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (exc.UnknownSetting, (exc.ImproperlyConfigured, AttributeError)),
        (exc.InvalidURL, (exc.ImproperlyConfigured, ValueError)),
        (exc.InvalidRate, (exc.ImproperlyConfigured, ValueError)),
        (exc.MissingExtra, (exc.ImproperlyConfigured, ImportError)),
        (exc.NoResultBackend, (exc.ImproperlyConfigured,)),
        (exc.NotRegistered, (exc.AqueueError, KeyError)),
        (exc.EncodeError, (exc.SerializationError, TypeError)),
        (exc.DecodeError, (exc.SerializationError, ValueError)),
        (exc.ContentDisallowed, (exc.SerializationError,)),
        (exc.OperationalError, (exc.AqueueError, ConnectionError)),
        (exc.TimeoutError, (exc.AqueueError, builtins.TimeoutError)),
        (exc.Retry, (exc.TaskPredicate,)),
        (exc.Ignore, (exc.TaskPredicate,)),
        (exc.Reject, (exc.TaskPredicate,)),
        (exc.MaxRetriesExceededError, (exc.AqueueError,)),
        (exc.TimeLimitExceeded, (exc.AqueueError,)),
        (exc.SoftTimeLimitExceeded, (exc.AqueueError,)),
    ],
)
def test_the_tree(cls: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    assert all(issubclass(cls, base) for base in bases)
    assert issubclass(cls, exc.AqueueError)


def test_unknown_setting_carries_name_and_suggestion() -> None:
    error = exc.UnknownSetting("task_serialiser", ["task_serializer", "result_serializer"])
    assert (error.name, error.suggestion) == ("task_serialiser", "task_serializer")
    assert str(error) == "Unknown setting 'task_serialiser'. Did you mean 'task_serializer'?"
    assert exc.UnknownSetting("zzz", ["task_serializer"]).suggestion is None


def test_missing_extra_names_the_pip_command() -> None:
    error = exc.MissingExtra("redis", "redis", "redis")
    assert "pip install 'aqueue[redis]'" in str(error)
    assert (error.scheme, error.extra) == ("redis", "redis")


def test_no_result_backend_names_the_setting() -> None:
    error = exc.NoResultBackend("tid")
    assert error.task_id == "tid" and "'result_backend'" in str(error)


def test_not_registered_reads_as_a_sentence() -> None:
    error = exc.NotRegistered("tasks.add")
    assert error.name == "tasks.add"
    assert str(error) == "Task 'tasks.add' is not registered."


def test_result_not_stored_says_what_to_change() -> None:
    error = exc.ResultNotStored("tid")
    assert error.task_id == "tid" and "ignore_result" in str(error)


def test_task_error_shows_the_remote_type() -> None:
    error = exc.TaskError("Gone", "remote.module", "it broke")
    assert (error.exc_type, error.exc_module, error.message) == ("Gone", "remote.module", "it broke")
    assert str(error) == "Gone: it broke"
    assert str(exc.TaskError("Gone", None, "")) == "Gone"
    assert repr(error) == "TaskError(exc_type='Gone', message='it broke')"


def test_retry_and_reject_carry_their_fields() -> None:
    cause = OSError("down")
    retry = exc.Retry(exc=cause, when=2.5)
    assert (retry.exc, retry.when) == (cause, 2.5)
    assert str(retry) == "Retry in 2.5s: OSError('down')"
    assert str(exc.Retry()) == "Retry"
    reject = exc.Reject("poison", requeue=True)
    assert (reject.reason, reject.requeue) == ("poison", True)
    assert repr(reject) == "Reject(reason='poison', requeue=True)"


def test_invalid_rate_keeps_the_rate() -> None:
    error = exc.InvalidRate("10/x")
    assert error.rate == "10/x" and "'10/x'" in str(error)
