"""Exceptions to stored data and back: only safely importable exception classes are rebuilt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aqueue import states
from aqueue.exceptions import NotRegistered, TaskError, TaskRevokedError, TimeLimitExceeded
from aqueue.result.base import TaskMeta
from aqueue.result.failure import exception_from_result, exception_to_result, format_traceback


class ModuleError(Exception):
    """An exception class defined in an imported module."""

    class Nested(Exception):
        pass


class NeedsTwo(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


def test_to_result_keeps_class_module_and_arguments() -> None:
    assert exception_to_result(ValueError("bad", 3)) == {
        "exc_type": "ValueError",
        "exc_module": "builtins",
        "exc_message": ["bad", 3],
    }


def test_arguments_that_are_not_plain_data_are_kept_as_text() -> None:
    stored = exception_to_result(KeyError(object))
    assert stored["exc_message"] == [str(KeyError(object))]


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        KeyError("k"),
        ZeroDivisionError(),
        ModuleError("mine"),
        ModuleError.Nested("deep"),
    ],
)
def test_round_trip_rebuilds_the_original_class_and_message(exc: Exception) -> None:
    rebuilt = exception_from_result(exception_to_result(exc))
    assert type(rebuilt) is type(exc)
    assert str(rebuilt) == str(exc)


def test_an_aqueue_exception_round_trips() -> None:
    rebuilt = exception_from_result(exception_to_result(NotRegistered("tasks.x")))
    assert isinstance(rebuilt, NotRegistered) and rebuilt.name == "tasks.x"


def test_a_class_whose_constructor_does_not_fit_becomes_task_error() -> None:
    stored = exception_to_result(NeedsTwo("a", "b"))
    rebuilt = exception_from_result(stored)
    assert isinstance(rebuilt, TaskError)
    assert (rebuilt.exc_type, rebuilt.exc_module, rebuilt.message) == ("NeedsTwo", __name__, "a and b")


@pytest.mark.parametrize(
    "stored",
    [
        {"exc_type": "Gone", "exc_module": "aqueue_no_such_module", "exc_message": ["x"]},
        {"exc_type": "NoSuchName", "exc_module": "builtins", "exc_message": ["x"]},
        {"exc_type": "system", "exc_module": "os", "exc_message": ["echo unsafe"]},
        {"exc_type": "Path", "exc_module": "pathlib", "exc_message": ["/tmp"]},
        {"exc_type": "KeyboardInterrupt", "exc_module": "builtins", "exc_message": []},
        {"exc_type": "ValueError", "exc_module": 42, "exc_message": ["x"]},
    ],
    ids=["missing-module", "missing-name", "function", "not-an-exception", "base-exception", "bad-module"],
)
def test_only_exception_classes_are_ever_called(stored: dict[str, object]) -> None:
    rebuilt = exception_from_result(stored)
    assert isinstance(rebuilt, TaskError)
    assert rebuilt.exc_type == stored["exc_type"]


def test_a_module_that_fails_to_import_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a module that raises when imported
    (tmp_path / "aqueue_broken_module.py").write_text("raise RuntimeError('import side effect')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stored = {"exc_type": "Boom", "exc_module": "aqueue_broken_module", "exc_message": ["m"]}
    # Then the exception comes back as TaskError, with its message
    rebuilt = exception_from_result(stored)
    assert isinstance(rebuilt, TaskError) and str(rebuilt) == "Boom: m"
    assert "aqueue_broken_module" not in sys.modules


def test_a_module_not_yet_imported_is_imported_when_it_imports_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "aqueue_errors_module.py").write_text("class Custom(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        rebuilt = exception_from_result(
            {"exc_type": "Custom", "exc_module": "aqueue_errors_module", "exc_message": ["hi"]}
        )
        assert type(rebuilt).__name__ == "Custom" and str(rebuilt) == "hi"
    finally:
        sys.modules.pop("aqueue_errors_module", None)


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ("just text", "just text"),
        ({"exc_type": "Gone", "exc_module": None, "exc_message": "one string"}, "one string"),
        ({"exc_type": "Gone", "exc_module": None, "exc_message": ["a", 2]}, "a 2"),
        ({"exc_type": "Gone", "exc_module": None}, ""),
    ],
)
def test_odd_stored_shapes_still_give_a_message(stored: object, message: str) -> None:
    rebuilt = exception_from_result(stored)
    assert isinstance(rebuilt, TaskError) and rebuilt.message == message


def test_format_traceback_names_the_exception_and_the_line() -> None:
    try:
        raise ModuleError("traced")
    except ModuleError as exc:
        text = format_traceback(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert 'raise ModuleError("traced")' in text
    assert text.rstrip().endswith("ModuleError: traced")


def test_celerys_namesakes_are_stored_under_celerys_modules() -> None:
    assert exception_to_result(NotRegistered("tasks.x")) == {
        "exc_type": "NotRegistered",
        "exc_message": ["tasks.x"],
        "exc_module": "celery.exceptions",
    }
    assert exception_to_result(TimeLimitExceeded("late"))["exc_module"] == "billiard.exceptions"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (
            {"exc_type": "TimeLimitExceeded", "exc_module": "billiard.exceptions", "exc_message": [300.0]},
            TimeLimitExceeded,
        ),
        (
            {"exc_type": "TimeLimitExceeded", "exc_module": "celery.exceptions", "exc_message": [300.0]},
            TimeLimitExceeded,
        ),
        (
            {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions", "exc_message": ["expired"]},
            TaskRevokedError,
        ),
        (
            {"exc_type": "NotRegistered", "exc_module": "celery.exceptions", "exc_message": ["tasks.x"]},
            NotRegistered,
        ),
    ],
)
def test_celerys_exceptions_come_back_as_aqueues(
    stored: dict[str, object], expected: type[Exception]
) -> None:
    assert type(exception_from_result(stored)) is expected


def test_an_argument_that_is_not_plain_data_is_kept_as_its_repr() -> None:
    assert exception_to_result(ValueError("bad", {"ok": [1]}, object))["exc_message"] == [
        "bad",
        {"ok": [1]},
        repr(object),
    ]


def test_a_revoked_state_is_stored_as_celerys_task_revoked_error() -> None:
    assert TaskMeta("t", states.REVOKED, "expired").to_dict()["result"] == {
        "exc_type": "TaskRevokedError",
        "exc_message": ["expired"],
        "exc_module": "celery.exceptions",
    }
