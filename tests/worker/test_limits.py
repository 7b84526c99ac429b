"""Worker limits: the concurrency limit and Celery's token bucket (capacity 1, starting full)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import anyio
import pytest

from aqueue.rates import parse_rate
from aqueue.worker.limits import BucketStatistics, ConcurrencyLimit, LimitStatistics, TokenBucket


async def test_concurrency_limit_lends_up_to_its_limit() -> None:
    limit = ConcurrencyLimit(2)
    # When two are taken, then a third is refused without waiting
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    assert limit.statistics() == LimitStatistics(limit=2, borrowed=2, waiting=0)
    # And a waiting acquire proceeds when one is released
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    assert limit.statistics().waiting == 1
    limit.release()
    with anyio.fail_after(1):
        await waiter
    assert limit.statistics() == LimitStatistics(2, 2, 0)
    limit.release()
    limit.release()
    assert limit.statistics().borrowed == 0


async def test_a_cancelled_waiter_is_not_counted() -> None:
    limit = ConcurrencyLimit(1)
    await limit.acquire()
    with anyio.move_on_after(0.01):
        await limit.acquire()
    assert limit.statistics() == LimitStatistics(1, 1, 0)


def test_a_freed_slot_is_handed_to_the_first_in_line() -> None:
    # Given one slot taken and two entries queued behind it
    limit = ConcurrencyLimit(1)
    started: list[str] = []
    assert limit.try_acquire()
    limit.queue(started.append, "a")
    limit.queue(started.append, "b")
    assert limit.statistics() == LimitStatistics(limit=1, borrowed=1, waiting=2)
    # When the slot is released, then it passes to the first entry, still borrowed
    limit.release()
    assert started == ["a"] and limit.statistics() == LimitStatistics(1, 1, 1)
    # And nobody overtakes the line, even with a slot free in a larger limit
    limit.limit = 2
    assert not limit.try_acquire()
    limit.release()
    limit.release()
    assert started == ["a", "b"] and limit.statistics() == LimitStatistics(2, 0, 0)
    assert limit.try_acquire()


async def _a_waiter_between_two_entries() -> tuple[ConcurrencyLimit, list[str], asyncio.Task[None]]:
    """One slot, taken; in line: an entry ``first``, an ``acquire()``, an entry ``last``."""
    limit = ConcurrencyLimit(1)
    started: list[str] = []
    assert limit.try_acquire()
    limit.queue(started.append, "first")
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.queue(started.append, "last")
    return limit, started, waiter


async def test_acquire_waits_in_the_same_line_as_queued_entries() -> None:
    limit, started, waiter = await _a_waiter_between_two_entries()
    # When slots are released, then they go in the order of the line
    limit.release()
    await asyncio.sleep(0)
    assert started == ["first"] and not waiter.done()
    limit.release()
    with anyio.fail_after(1):
        await waiter
    assert started == ["first"]
    limit.release()
    assert started == ["first", "last"] and limit.statistics() == LimitStatistics(1, 1, 0)


async def test_withdraw_takes_the_queued_entries_out_in_order() -> None:
    limit, started, waiter = await _a_waiter_between_two_entries()
    # When the queued entries are withdrawn, then their arguments come back and the acquire keeps its place
    assert limit.withdraw() == [("first",), ("last",)]
    assert limit.statistics().waiting == 1
    limit.release()
    with anyio.fail_after(1):
        await waiter
    assert started == []


@pytest.mark.parametrize("handed_first", [False, True], ids=["in-line", "just-handed"])
async def test_a_cancelled_acquire_passes_its_slot_on(handed_first: bool) -> None:
    # Given an acquire waiting in front of a queued entry
    limit = ConcurrencyLimit(1)
    started: list[str] = []
    assert limit.try_acquire()
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.queue(started.append, "next")
    # When the acquire is cancelled while still in line, or just after it was handed the slot
    if handed_first:
        limit.release()
    waiter.cancel()
    if not handed_first:
        limit.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # Then the entry behind it gets the slot
    assert started == ["next"]
    assert limit.statistics() == LimitStatistics(1, 1, 0)


def test_no_rate_means_no_limit() -> None:
    bucket = TokenBucket(None)
    assert all(bucket.try_acquire() for _ in range(1000))
    assert bucket.statistics() == BucketStatistics(rate=None, tokens=1.0, waiting=0)


def test_the_bucket_starts_full_with_one_token() -> None:
    # Given 10/m: one task at once, then one every 6 s
    bucket = TokenBucket(parse_rate("10/m"))
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    stats = bucket.statistics()
    assert stats.rate == "10/m" and stats.tokens < 0.01


def test_ten_per_minute_refills_one_token_in_six_seconds() -> None:
    # Given an empty 10/m bucket
    bucket = TokenBucket(parse_rate("10/m"))
    assert bucket.try_acquire()
    # When 5.9 s have passed (moving its clock back), then there is no token yet
    bucket._count.stamp -= 5.9
    assert not bucket.try_acquire()
    # And at 6 s there is one, and only one
    bucket._count.stamp -= 0.15
    assert bucket.try_acquire()
    assert not bucket.try_acquire()


def test_tokens_never_exceed_the_capacity_of_one() -> None:
    bucket = TokenBucket(parse_rate("10/s"))
    bucket._count.stamp -= 3600
    assert bucket.statistics().tokens == 1.0
    assert bucket.try_acquire() and not bucket.try_acquire()


async def test_acquire_waits_for_the_next_token() -> None:
    # Given 20/s: a token every 50 ms
    bucket = TokenBucket(parse_rate("20/s"))
    started = time.monotonic()
    with anyio.fail_after(2):
        for _ in range(5):
            await bucket.acquire()
    # Then the first came at once and the next four about 50 ms apart
    assert 0.19 <= time.monotonic() - started < 1.0


async def test_set_rate_applies_to_tasks_already_waiting() -> None:
    # Given a task waiting on a 1/h bucket
    bucket = TokenBucket(parse_rate("1/h"))
    assert bucket.try_acquire()
    waiter = asyncio.create_task(bucket.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done() and bucket.statistics().waiting == 1
    # When the limit is removed, then it proceeds at once
    bucket.set_rate(None)
    with anyio.fail_after(1):
        await waiter
    assert bucket.statistics().waiting == 0


async def test_set_rate_to_a_faster_rate_shortens_the_wait() -> None:
    bucket = TokenBucket(parse_rate("1/h"))
    assert bucket.try_acquire()
    waiter = asyncio.create_task(bucket.acquire())
    await asyncio.sleep(0.01)
    bucket.set_rate(parse_rate("50/s"))
    with anyio.fail_after(1):
        await waiter


def test_statistics_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TokenBucket(None).statistics().tokens = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ConcurrencyLimit(1).statistics().limit = 2  # type: ignore[misc]


def test_release_of_a_token_gives_nothing_back() -> None:
    bucket = TokenBucket(parse_rate("1/h"))
    assert bucket.try_acquire()
    bucket.release()
    assert not bucket.try_acquire()
