"""Exceptions to stored data and back: rebuild only exception classes that import safely."""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

from aqueue.exceptions import TaskError

__all__ = ["exception_from_result", "exception_to_result", "format_traceback"]

_PLAIN = (str, int, float, bool, type(None))


def exception_to_result(exc: BaseException) -> dict[str, Any]:
    """What is stored for a failed task: the class, its module, its message and arguments."""
    cls = type(exc)
    plain = exc.args and all(isinstance(a, _PLAIN) for a in exc.args)
    args = list(exc.args) if plain else [str(exc)]
    return {"exc_type": cls.__qualname__, "exc_module": cls.__module__, "exc_message": args}


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def exception_from_result(result: Any) -> BaseException:
    """Rebuild the exception stored by :func:`exception_to_result`.

    The original class is used when its module is already imported or imports cleanly and the name is
    an Exception subclass there; anything else comes back as :class:`TaskError` with the type name.
    """
    if not isinstance(result, dict):
        return TaskError("Exception", None, str(result))
    exc_type, module = str(result.get("exc_type", "Exception")), result.get("exc_module")
    args = result.get("exc_message") or []
    if not isinstance(args, list | tuple):
        args = [args]
    message = " ".join(str(a) for a in args) if len(args) != 1 else str(args[0])
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
