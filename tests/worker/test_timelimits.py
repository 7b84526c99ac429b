"""SPEC section 8, time limits: the soft limit is raised inside the coroutine, the hard one cancels it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from aqueue import App
from aqueue.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from aqueue.testing import running_worker
from aqueue.worker.timelimits import run_limited

MakeApp = Callable[..., App]


async def test_the_soft_limit_is_raised_at_the_await_and_can_be_caught() -> None:
    # Given a coroutine that catches the soft limit and cleans up
    steps: list[str] = []

    async def job() -> str:
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            steps.append("caught")
            await asyncio.sleep(0.01)  # cleanup may await
            return "cleaned up"
        return "slept"

    # Then it returns what its handler returns, well before the sleep would end
    began = time.monotonic()
    assert await run_limited(job(), 0.05, None, "job") == "cleaned up"
    assert steps == ["caught"] and time.monotonic() - began < 2


async def test_an_uncaught_soft_limit_fails_and_the_hard_limit_then_cancels() -> None:
    async def ignores() -> None:
        await asyncio.sleep(5)

    with pytest.raises(SoftTimeLimitExceeded, match=r"soft time limit of 0\.05s"):
        await run_limited(ignores(), 0.05, 1.0, "Task t[1]")

    async def keeps_going() -> None:
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(5)  # ignores the soft limit: the hard one stops it

    began = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match=r"time limit of 0\.2s"):
        await run_limited(keeps_going(), 0.05, 0.2, "Task t[2]")
    assert time.monotonic() - began < 2


async def test_the_soft_limit_leaves_other_cancellations_and_timeouts_alone() -> None:
    async def inner_timeout() -> str:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        except TimeoutError:
            return "own timeout"
        return "no"

    assert await run_limited(inner_timeout(), 5.0, None, "job") == "own timeout"
    job = asyncio.ensure_future(run_limited(asyncio.sleep(5), 5.0, None, "job"))
    await asyncio.sleep(0.01)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job


async def test_a_worker_stores_the_soft_limit_and_honours_call_level_limits(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(soft_time_limit=0.05)
    async def slow() -> str:
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            return "soft"
        return "slept"

    @app.task
    async def sleeper(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @app.task(time_limit=0.05)
    def blocking() -> str:
        time.sleep(0.2)
        return "late"

    async with running_worker(app):
        assert await slow.delay().get(timeout=5) == "soft"
        with pytest.raises(TimeLimitExceeded):
            await sleeper.apply_async((5,), time_limit=0.05).get(timeout=5)
        with pytest.raises(SoftTimeLimitExceeded):
            await sleeper.apply_async((5,), soft_time_limit=0.05).get(timeout=5)
        # a thread cannot be interrupted: a late return is stored as TimeLimitExceeded
        with pytest.raises(TimeLimitExceeded, match="returned past its time limit"):
            await blocking.delay().get(timeout=5)
