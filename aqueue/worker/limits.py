"""Worker limits: the concurrency limit and per-task token buckets, sharing one shape.

Each has ``await acquire()``, ``try_acquire()`` (no wait), ``release()`` and ``statistics()``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aqueue.rates import Rate

__all__ = ["BucketStatistics", "ConcurrencyLimit", "LimitStatistics", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class LimitStatistics:
    limit: int
    borrowed: int
    waiting: int


class ConcurrencyLimit:
    """At most ``limit`` tasks run at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self._waiting = 0

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1

    def try_acquire(self) -> bool:
        if self._semaphore.locked():
            return False
        self._semaphore._value -= 1  # an uncontended acquire, without a coroutine
        return True

    def release(self) -> None:
        self._semaphore.release()

    def statistics(self) -> LimitStatistics:
        return LimitStatistics(self.limit, self.limit - self._semaphore._value, self._waiting)


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

    capacity = 1.0

    def __init__(self, rate: Rate | None) -> None:
        self.rate = rate
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._changed = asyncio.Event()
        self._waiting = 0

    def try_acquire(self) -> bool:
        if self.rate is None:
            return True
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            while not self.try_acquire():
                assert self.rate is not None
                pause = (1.0 - self._tokens) / self.rate.per_second
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
        self._refill()
        self.rate = rate
        self._changed.set()

    def statistics(self) -> BucketStatistics:
        self._refill()
        return BucketStatistics(str(self.rate) if self.rate else None, self._tokens, self._waiting)

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate.per_second)
        self._stamp = now
