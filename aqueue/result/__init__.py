"""Result backends: the seam in :mod:`aqueue.result.base`, one module per store, and ``from_url``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aqueue.exceptions import ImproperlyConfigured, MissingExtra
from aqueue.result.asyncresult import AsyncResult
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.urls import BACKEND_SCHEMES, parse

__all__ = ["AsyncResult", "ResultBackend", "TaskMeta", "from_url"]


def from_url(
    url: str | None,
    *,
    serializer: str = "json",
    expires: float | None = None,
    broker_url: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> ResultBackend:
    """The result backend for ``url``; ``None`` gives the disabled backend.

    ``broker_url`` is used by ``rpc://``, which replies over the (AMQP) broker. ``options`` are the
    ``result_backend_transport_options`` setting (Redis: ``global_keyprefix``, ``client_name``,
    ``socket_timeout``; with Sentinel ``master_name``, ``sentinel_kwargs``, ``min_other_sentinels``).

    Raises:
        InvalidURL: an unknown scheme or a malformed URL.
        MissingExtra: the backend's optional dependency is not installed (names the pip command).
    """
    if not url:
        from aqueue.result.disabled import DisabledBackend

        return DisabledBackend()
    match parse(url, kinds=BACKEND_SCHEMES, role="result backend").scheme:
        case "memory":
            from aqueue.result.memory import MemoryBackend

            return MemoryBackend(url, serializer, expires)
        case "sqlite":
            from aqueue.result.sqlite import SQLiteBackend

            return SQLiteBackend(url, serializer, expires)
        case "redis" | "rediss" | "sentinel" as scheme:
            with MissingExtra.guard(scheme, "redis"):
                from aqueue.result.redis import RedisBackend
            from aqueue._redis import SENTINEL_OPTIONS

            known: tuple[str, ...] = ("global_keyprefix", "client_name", "socket_timeout", *SENTINEL_OPTIONS)
            return RedisBackend(url, serializer, expires, **_checked(options, known))
        case "redis+cluster":
            with MissingExtra.guard("redis+cluster", "redis"):
                from aqueue.result.redis_cluster import RedisClusterBackend
            known = ("global_keyprefix", "client_name", "socket_timeout")
            return RedisClusterBackend(url, serializer, expires, **_checked(options, known))
        case _:
            with MissingExtra.guard("rpc", "amqp"):
                from aqueue.result.rpc import RPCBackend
            return RPCBackend(url, serializer, expires, broker_url=broker_url)


def _checked(options: Mapping[str, Any] | None, known: tuple[str, ...]) -> dict[str, Any]:
    """``options`` when every name is one of ``known``; else an error naming the closest."""
    import difflib

    for name in options or {}:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known options: {', '.join(known)}."
            raise ImproperlyConfigured(f"Unknown result_backend_transport_options key {name!r}.{hint}")
    return dict(options or {})
