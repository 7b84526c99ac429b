"""Exceptions to stored data and back, in Celery's layout; rebuild only exception classes that import safely.

A failure is stored as Celery stores it: ``{"exc_type": <qualified class name>, "exc_message": <the
exception's args>, "exc_module": <its module>}``, an argument that is not plain data (str, numbers,
bools, None, and lists and dicts of those) kept as its ``repr``. So a Celery client rebuilds what an
aqueue worker stored, and the other way round.

aqueue's exceptions that Celery has too (``NotRegistered``, ``TaskRevokedError``, ``TimeLimitExceeded``,
``Retry``, ...) are stored under Celery's module names (``celery.exceptions``, ``billiard.exceptions``),
so that a Celery client gets its own class; reading, those names give aqueue's classes, with no import of
Celery.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

from aqueue import exceptions
from aqueue.exceptions import TaskError

__all__ = ["exception_from_result", "exception_to_result", "format_traceback"]

_PLAIN = (str, int, float, bool, type(None))
_CELERY = {
    "NotRegistered": "celery.exceptions",
    "TaskRevokedError": "celery.exceptions",
    "MaxRetriesExceededError": "celery.exceptions",
    "TimeoutError": "celery.exceptions",
    "Retry": "celery.exceptions",
    "Ignore": "celery.exceptions",
    "Reject": "celery.exceptions",
    "ChordError": "celery.exceptions",
    "TimeLimitExceeded": "billiard.exceptions",
    "SoftTimeLimitExceeded": "billiard.exceptions",
}
"""aqueue's exceptions with a Celery namesake, and the module Celery stores that namesake under."""
_AS_CELERY: dict[type[BaseException], str] = {
    cls: module
    for name, module in _CELERY.items()
    if isinstance(cls := getattr(exceptions, name, None), type)
}
_FROM_CELERY: dict[tuple[str, str], type[BaseException]] = {
    (module, cls.__name__): cls for cls, module in _AS_CELERY.items()
} | {("celery.exceptions", cls.__name__): cls for cls in _AS_CELERY}  # Celery re-exports billiard's


def exception_to_result(exc: BaseException) -> dict[str, Any]:
    """What is stored for a failed task: Celery's ``exc_type``, ``exc_message`` (the args), ``exc_module``."""
    cls = type(exc)
    args = [arg if _is_plain(arg) else repr(arg) for arg in exc.args]
    if not args and (text := str(exc)):
        args = [text]  # an exception whose message is not in its args (pydantic's ValidationError, ...)
    return {
        "exc_type": cls.__qualname__,
        "exc_message": args,
        "exc_module": _AS_CELERY.get(cls, cls.__module__),
    }


def _is_plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if depth > 8:
        return False
    if isinstance(value, list | tuple):
        return all(_is_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def exception_from_result(result: Any) -> BaseException:
    """Rebuild the exception stored by :func:`exception_to_result` (or by Celery).

    The original class is used when its module is already imported or imports cleanly and the name is
    an Exception subclass there (Celery's namesakes of aqueue's exceptions give aqueue's); anything else
    comes back as :class:`TaskError` with the type name.
    """
    if not isinstance(result, dict):
        return TaskError("Exception", None, str(result))
    exc_type, module = str(result.get("exc_type", "Exception")), result.get("exc_module")
    args = result.get("exc_message") or []
    if not isinstance(args, list | tuple):
        args = [args]
    message = " ".join(str(a) for a in args) if len(args) != 1 else str(args[0])
    cls = _FROM_CELERY.get((module, exc_type)) if isinstance(module, str) else None
    if cls is None:
        cls = _find_class(module, exc_type)
    if cls is not None:
        try:
            return cls(*args)
        except Exception:
            pass
    return TaskError(exc_type, module if isinstance(module, str) else None, message)


def _find_class(module_name: object, qualname: str) -> type[Exception] | None:
    if not isinstance(module_name, str):
        return None
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            return None
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None
