"""Worker limits: the concurrency limit and per-task token buckets, sharing one shape.

Each has ``await acquire()``, ``try_acquire()`` (no wait), ``release()`` and ``statistics()``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aqueue.broker.base import Broker
from aqueue.rates import Rate, Tokens

__all__ = ["BucketStatistics", "ConcurrencyLimit", "LimitStatistics", "SharedBucket", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class LimitStatistics:
    limit: int
    borrowed: int
    waiting: int


class ConcurrencyLimit:
    """At most ``limit`` tasks run at once; the others wait in one first-come, first-served line.

    :meth:`release` hands a freed slot straight to the first in line (it goes back to the pool only when
    nobody waits), and :meth:`try_acquire` fails while anyone is in line, so nobody overtakes. The line
    holds :meth:`acquire` calls and, without a task each, what :meth:`queue` puts there.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.borrowed = 0
        self._line: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._wake = self._hand_to_waiter  # one bound method: acquire() entries are told apart by it

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        handed = asyncio.get_running_loop().create_future()
        entry = (self._wake, (handed,))
        self._line.append(entry)
        try:
            await handed
        except asyncio.CancelledError:
            if not handed.cancelled():
                self.release()  # a slot was handed over just as the wait was cancelled: pass it on
            elif entry in self._line:
                self._line.remove(entry)
            raise

    def try_acquire(self) -> bool:
        if self.borrowed < self.limit and not self._line:
            self.borrowed += 1
            return True
        return False

    def queue(self, start: Callable[..., object], *args: Any) -> None:
        """Wait in line without a task: the :meth:`release` that hands this a slot calls ``start(*args)``."""
        self._line.append((start, args))

    def release(self) -> None:
        """Give a slot back, or hand it to the first in line."""
        if self._line:
            start, args = self._line.popleft()
            start(*args)
        else:
            self.borrowed -= 1

    def withdraw(self) -> list[tuple[Any, ...]]:
        """Take what :meth:`queue` put in line out of it: the ``args`` of each, in order."""
        queued = self.queued()
        if queued:
            self._line = deque(entry for entry in self._line if entry[0] is self._wake)
        return queued

    def queued(self) -> list[tuple[Any, ...]]:
        """The ``args`` of what :meth:`queue` put in line, in order (they stay in line)."""
        wake = self._wake
        return [args for start, args in self._line if start is not wake]

    def _hand_to_waiter(self, handed: asyncio.Future[None]) -> None:
        if handed.cancelled():
            self.release()  # its acquire() was cancelled while in line: the next one gets the slot
        else:
            handed.set_result(None)

    def statistics(self) -> LimitStatistics:
        return LimitStatistics(self.limit, self.borrowed, len(self._line))


@dataclass(frozen=True, slots=True)
class BucketStatistics:
    rate: str | None
    tokens: float
    waiting: int


class TokenBucket:
    """Celery's token bucket: capacity 1, starting full, refilled at ``rate``; ``None`` means no limit.

    ``10/m`` lets one task start at once, then one every 6 seconds. ``set_rate`` applies at once,
    also to tasks already waiting.
    """

    def __init__(self, rate: Rate | None) -> None:
        self._count = Tokens(rate)
        self._changed = asyncio.Event()
        self._waiting = 0

    @property
    def rate(self) -> Rate | None:
        return self._count.rate

    def try_acquire(self) -> bool:
        return self._count.take() == 0.0

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            while pause := self._count.take():
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), pause)
                except TimeoutError:
                    pass
        finally:
            self._waiting -= 1

    def release(self) -> None:
        """Tokens are not given back: a started task used its token."""

    def set_rate(self, rate: Rate | None) -> None:
        self._count.set_rate(rate)
        self._changed.set()

    def statistics(self) -> BucketStatistics:
        self._count.refill()
        return BucketStatistics(str(self.rate) if self.rate else None, self._count.tokens, self._waiting)


class SharedBucket:
    """A token bucket every worker of the broker shares (``global_rate_limit``), kept by the broker."""

    def __init__(self, broker: Broker, key: str, rate: Rate) -> None:
        self.broker, self.key, self.rate = broker, key, rate
        self._waiting = 0

    def try_acquire(self) -> bool:
        """Always False: a shared token takes a round trip, so it is taken by :meth:`acquire`."""
        return False

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            while pause := await self.broker.take_token(self.key, self.rate):
                await asyncio.sleep(pause)
        finally:
            self._waiting -= 1

    def release(self) -> None:
        """Tokens are not given back: a started task used its token."""

    def statistics(self) -> BucketStatistics:
        return BucketStatistics(f"{self.rate} (global)", 0.0, self._waiting)
