"""What the Redis broker and result backend share: connection arguments, and round trips by hand.

redis-py's pipelines and pool cost more CPU per round trip than the rest of a publish or an ack (a
condition and a timeout to take a pooled connection, a health check, a command stack, observability
hooks). The hot paths instead pack their commands here (:func:`pack`) and send them on a
:class:`Line`, one connection whose round trips go one after another.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import DataError, ResponseError

from aqueue.exceptions import InvalidURL
from aqueue.urls import mask_password

__all__ = ["Line", "connection_kwargs", "exchange", "pack", "read_replies"]


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


def pack(*parts: bytes | str | int | float) -> bytes:
    """One command in RESP, encoded as redis-py encodes it (text as UTF-8, numbers as their ``repr``).

    Raises:
        DataError: a part is of another type (a bool, None).
    """
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, bytes):
            data = part
        elif isinstance(part, int | float) and not isinstance(part, bool):
            data = repr(part).encode()
        else:
            raise DataError(f"Invalid input of type: {type(part).__name__!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def exchange(conn: AbstractConnection, packed: bytes | list[bytes], count: int) -> list[Any]:
    """Send ``count`` packed commands and read their replies; an error reply is returned in its place.

    On any failure (cancellation included) the connection is closed, since the replies still due
    would be read by the next caller; the next send reconnects.
    """
    try:
        await conn.send_packed_command(packed)  # a health check only with health_check_interval
        return await read_replies(conn, count)
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


async def read_replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies on ``conn``; an error reply is returned in its place, not raised."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


_Queued = tuple[bytes, int, "asyncio.Future[list[Any]]"]


class Line:
    """One connection whose round trips go one after another, each waited for at most ``timeout`` s.

    A send on an idle line writes at once, in the caller's task; sends that come while a round trip is
    in flight go together in the next write. So concurrent callers share writes and need no pool.
    """

    def __init__(self, conn: AbstractConnection, timeout: float) -> None:
        self.conn, self.timeout = conn, timeout
        self._queued: list[_Queued] = []
        self._busy = False
        self._drainer: asyncio.Task[None] | None = None

    async def send(self, packed: bytes, count: int) -> list[Any]:
        """The replies of the ``count`` commands in ``packed``, an error reply as its ResponseError.

        Raises:
            RedisError, OSError: the connection failed (it is closed; the next send reconnects).
            TimeoutError: no reply in ``timeout`` seconds.
        """
        if self._busy:
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._queued.append((packed, count, future))
            return await future
        self._busy = True
        try:
            return await self._round_trip(packed, count)
        finally:
            if self._queued:
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            else:
                self._busy = False

    async def connect(self) -> None:
        """Open the connection now (else the first send opens it)."""
        if not self.conn.is_connected:
            async with asyncio.timeout(self.timeout):
                await self.conn.connect()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        for *_, future in self._queued:
            future.cancel()
        self._queued.clear()
        await self.conn.disconnect()

    async def _round_trip(self, packed: bytes | list[bytes], count: int) -> list[Any]:
        async with asyncio.timeout(self.timeout):
            return await exchange(self.conn, packed, count)

    async def _drain(self) -> None:
        batch: list[_Queued] = []
        try:
            while self._queued:
                batch = [queued for queued in self._queued if not queued[2].done()]
                self._queued = []
                if not batch:
                    continue
                try:
                    replies = await self._round_trip([p for p, _, _ in batch], sum(n for _, n, _ in batch))
                except Exception as exc:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for _, n, future in batch:
                    if not future.done():
                        future.set_result(replies[start : start + n])
                    start += n
        finally:
            for *_, future in batch:
                if not future.done():
                    future.cancel()  # the line was closed under it
            self._busy, self._drainer = False, None
