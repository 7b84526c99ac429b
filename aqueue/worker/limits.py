"""Worker limits: the concurrency limit and per-task token buckets, sharing one shape.

Each has ``await acquire()``, ``try_acquire()`` (no wait), ``release()`` and ``statistics()``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aqueue.broker.base import Broker
from aqueue.rates import Rate, Tokens

__all__ = ["BucketStatistics", "ConcurrencyLimit", "LimitStatistics", "SharedBucket", "TokenBucket"]


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
