"""Stopping background tasks that survive a cancellation (aqueue._tasks)."""

from __future__ import annotations

import asyncio
import time

from aqueue._tasks import cancel_until_done


async def test_a_task_that_survives_one_cancellation_is_cancelled_until_it_ends() -> None:
    # Given a loop that, as a client library can, turns the first cancellation into an error it retries on
    survived = 0

    async def stubborn() -> None:
        nonlocal survived
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if survived:
                    raise
                survived += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    # When it is cancelled until done
    started = time.monotonic()
    left = await cancel_until_done([task], timeout=5)
    # Then it ended, after surviving once, well within the bound
    assert left == set() and task.cancelled() and survived == 1
    assert time.monotonic() - started < 2


async def test_a_task_that_never_ends_is_returned_after_the_timeout() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await cancel_until_done([task], timeout=0.6) == {task}
    assert 0.5 < time.monotonic() - started < 2
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    assert task.done()


async def test_nothing_to_cancel_returns_at_once() -> None:
    assert await cancel_until_done([], timeout=5) == set()
