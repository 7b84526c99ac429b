"""Which queue a task goes to: explicit > task_routes > the task's own queue > task_default_queue."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aqueue.exceptions import ImproperlyConfigured

__all__ = ["Router"]

RouteFunction = Callable[..., Any]


class Router:
    """Resolves task names to queues from the ``task_routes`` setting; static answers are cached."""

    def __init__(self, routes: Any, default_queue: str) -> None:
        self.default_queue = default_queue
        self._tables: list[Mapping[str, Any] | RouteFunction] = _tables(routes)
        self.dynamic = any(callable(t) for t in self._tables)
        self._cache: dict[tuple[str, str | None], str] = {}

    def queue_for(self, name: str, task_queue: str | None = None, args: Any = (), kwargs: Any = None) -> str:
        """The queue for task ``name``; ``task_queue`` is the queue set on the task itself."""
        key = (name, task_queue)
        found = self._cache.get(key)
        if found is None:
            found = self._route(name, args, kwargs) or task_queue or self.default_queue
            if not self.dynamic:
                self._cache[key] = found
        return found

    def _route(self, name: str, args: Any, kwargs: Any) -> str | None:
        for table in self._tables:
            if callable(table):
                route = table(name, args, kwargs or {}, {}, None)
            else:
                route = table.get(name) or _glob(table, name)
            if route:
                return _queue_of(route)
        return None


def _tables(routes: Any) -> list[Mapping[str, Any] | RouteFunction]:
    if routes is None:
        return []
    if isinstance(routes, Mapping) or callable(routes):
        return [routes]
    if isinstance(routes, Sequence) and not isinstance(routes, str):
        return [t for r in routes for t in _tables(r)]
    raise ImproperlyConfigured(
        f"task_routes must be a mapping {{'tasks.add': 'queue'}}, a function, or a list of them; got {routes!r}"
    )


def _glob(table: Mapping[str, Any], name: str) -> Any:
    for pattern, route in table.items():
        if "*" in pattern and fnmatch.fnmatchcase(name, pattern):
            return route
    return None


def _queue_of(route: Any) -> str:
    if isinstance(route, str):
        return route
    if isinstance(route, Mapping) and isinstance(route.get("queue"), str):
        return str(route["queue"])
    raise ImproperlyConfigured(f"A task route must be a queue name or {{'queue': name}}; got {route!r}")
