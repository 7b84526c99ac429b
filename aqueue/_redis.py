"""What the Redis broker and result backend share: turning a URL into connection arguments."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from aqueue.exceptions import InvalidURL
from aqueue.urls import mask_password

__all__ = ["connection_kwargs"]


def connection_kwargs(url: str, **options: Any) -> dict[str, Any]:
    """redis-py connection arguments for ``url``, with ``options`` over aqueue's defaults.

    Raises:
        InvalidURL: the URL does not parse, or its path is not a database number.
    """
    path = urlsplit(url).path.strip("/")
    if path and not path.isdigit():
        raise InvalidURL(f"Invalid redis URL {mask_password(url)!r}: the path must be a database number")
    try:
        kwargs: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise InvalidURL(f"Invalid redis URL {mask_password(url)!r}: {exc}") from exc
    kwargs.update(options)
    # Replies are awaited under asyncio.timeout(): with a socket_timeout, redis-py sends through
    # asyncio.wait_for, which on Python 3.11 can swallow the cancellation of the calling task.
    kwargs.update(protocol=2, socket_timeout=None)
    kwargs.setdefault("client_name", "aqueue")
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3))
    return kwargs
