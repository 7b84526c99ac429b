"""Result backends: the seam in :mod:`aqueue.result.base`, one module per store, and ``from_url``."""

from __future__ import annotations

from aqueue.exceptions import MissingExtra
from aqueue.result.asyncresult import AsyncResult
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.urls import BACKEND_SCHEMES, parse

__all__ = ["AsyncResult", "ResultBackend", "TaskMeta", "from_url"]


def from_url(
    url: str | None, *, serializer: str = "json", expires: float | None = None, broker_url: str | None = None
) -> ResultBackend:
    """The result backend for ``url``; ``None`` gives the disabled backend.

    ``broker_url`` is used by ``rpc://``, which replies over the (AMQP) broker.

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
        case "redis" | "rediss" as scheme:
            try:
                from aqueue.result.redis import RedisBackend
            except ModuleNotFoundError as exc:
                raise MissingExtra(scheme, "redis", "redis") from exc
            return RedisBackend(url, serializer, expires)
        case _:
            try:
                from aqueue.result.rpc import RPCBackend
            except ModuleNotFoundError as exc:
                raise MissingExtra("rpc", "amqp", "aio-pika") from exc
            return RPCBackend(url, serializer, expires, broker_url=broker_url)
