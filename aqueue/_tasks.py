"""Stopping background tasks that may not stop on the first cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

__all__ = ["cancel_until_done"]


async def cancel_until_done(tasks: Iterable[asyncio.Task[None]], timeout: float) -> set[asyncio.Task[None]]:
    """Cancel ``tasks`` until they end, at most ``timeout`` seconds; returns those still running.

    A task is cancelled again while it runs on: a client library under it (redis-py, aio-pika) may turn
    one cancellation into an error of its own, which a loop that retries on such errors survives.
    """
    pending = set(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.25, left))
    return pending
