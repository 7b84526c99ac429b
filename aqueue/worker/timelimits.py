"""Time limits of ``async def`` tasks: a soft one raised inside the coroutine, a hard one that cancels it.

``soft_time_limit``: when it passes, :class:`~aqueue.exceptions.SoftTimeLimitExceeded` is raised inside
the task's coroutine at the ``await`` where it is, once; the task may catch it and clean up.
``time_limit``: when it passes, the task is cancelled and fails with
:class:`~aqueue.exceptions.TimeLimitExceeded`.

The soft limit works as ``asyncio.timeout`` does (the task is cancelled when the limit passes, and the
cancellation is taken back with ``uncancel``), except that the exception is thrown into the innermost
coroutine, the task's own, instead of surfacing at a ``with`` block: :class:`_Soft` drives the coroutine,
passing every future it awaits up to the asyncio task unchanged, and turns the one cancellation it
caused into ``SoftTimeLimitExceeded``. Only tasks with a soft limit are driven this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

from aqueue.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

__all__ = ["run_limited"]


async def run_limited(
    coro: Coroutine[Any, Any, Any], soft: float | None, hard: float | None, what: str
) -> Any:
    """Await ``coro`` under its limits (seconds from now; ``None``: no limit). ``what`` names it in errors.

    Raises:
        TimeLimitExceeded: ``hard`` passed; the coroutine was cancelled.
        SoftTimeLimitExceeded: ``soft`` passed and the coroutine let the exception out.
    """
    if soft is not None and (hard is None or soft < hard):
        coro = _soft(coro, soft, what)
    if hard is None:
        return await coro
    try:
        async with asyncio.timeout(hard):
            return await coro
    except TimeoutError as exc:
        raise TimeLimitExceeded(f"{what} exceeded its time limit of {hard}s") from exc


async def _soft(coro: Coroutine[Any, Any, Any], soft: float, what: str) -> Any:
    task = asyncio.current_task()
    assert task is not None
    driver = _Soft(coro, task, f"{what} exceeded its soft time limit of {soft}s")
    timer = asyncio.get_running_loop().call_later(soft, driver.fire)
    try:
        return await driver
    finally:
        timer.cancel()


class _Soft:
    """Awaits a coroutine, throwing SoftTimeLimitExceeded into it in place of the cancellation ``fire`` made."""

    def __init__(self, coro: Coroutine[Any, Any, Any], task: asyncio.Task[Any], message: str) -> None:
        self.coro, self.task, self.message = coro, task, message
        self.fired = False

    def fire(self) -> None:
        if not self.task.done():
            self.fired = True
            self.task.cancel()

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, send = self.coro, None
        thrown: BaseException | None = None
        while True:
            try:
                yielded = coro.send(send) if thrown is None else coro.throw(thrown)
            except StopIteration as stop:
                return stop.value
            send = thrown = None
            try:
                send = yield yielded
            except asyncio.CancelledError as cancelled:
                if self.fired:
                    self.fired = False
                    self.task.uncancel()  # this cancellation was ours: it becomes the soft limit
                    thrown = SoftTimeLimitExceeded(self.message)
                else:
                    thrown = cancelled
            except BaseException as exc:
                thrown = exc
