"""A background task that loses its first cancellation, as redis-py and aio-pika can make one do."""

from __future__ import annotations

import asyncio


def stubborn_task() -> tuple[asyncio.Task[None], asyncio.Event]:
    """A task that swallows its first cancellation and runs on; the event is set once it swallowed it."""
    swallowed = asyncio.Event()

    async def run() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(60)

    return asyncio.create_task(run()), swallowed
