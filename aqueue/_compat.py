"""Small helpers shared by the core."""

from __future__ import annotations

import functools
import inspect
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncResource", "is_async_callable"]


class AsyncResource:
    """Something with connections: ``async with`` it, or call ``connect()`` and ``aclose()``."""

    async def connect(self) -> None:
        """Open connections; safe to call more than once."""

    async def aclose(self) -> None:
        """Close connections."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def is_async_callable(obj: Any) -> bool:
    """Whether calling ``obj`` returns a coroutine (sees through functools.partial and __call__)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or (
        callable(obj) and inspect.iscoroutinefunction(getattr(obj, "__call__", None))  # noqa: B004
    )
