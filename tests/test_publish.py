"""Publisher: sends of one loop turn become one broker call; failures reach every waiting send."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio
import pytest

from aqueue.exceptions import AqueueError, OperationalError
from aqueue.message import Envelope
from aqueue.publish import Publisher, RetryPolicy


def envelope(n: int) -> Envelope:
    return Envelope(f"id-{n}", "celery", b"{}", "application/json")


class FakeBroker:
    """Records each publish call; fails the first ``failures`` calls with ``error``."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.calls: list[list[str]] = []
        self.resent: list[list[bool]] = []
        self.failures, self.error = failures, error or OperationalError("down")

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.calls.append([e.id for e in envelopes])
        self.resent.append([e.resent for e in envelopes])
        if len(self.calls) <= self.failures:
            raise self.error


async def test_sends_of_one_loop_turn_are_one_batch() -> None:
    broker = FakeBroker()
    publisher = Publisher(broker.publish)
    # When three envelopes are submitted in one loop turn, and one in a later turn
    futures = [publisher.submit(envelope(n)) for n in range(3)]
    with anyio.fail_after(1):
        await asyncio.gather(*futures)
        await publisher.submit(envelope(3))
    # Then the first three went in one call, in order
    assert broker.calls == [["id-0", "id-1", "id-2"], ["id-3"]]


async def test_operational_errors_are_retried_per_policy() -> None:
    broker = FakeBroker(failures=2)
    publisher = Publisher(broker.publish, RetryPolicy(max_retries=3, interval_start=0, interval_step=0.01))
    with anyio.fail_after(1):
        await publisher.submit(envelope(0))
    assert len(broker.calls) == 3


async def test_retried_envelopes_are_marked_resent() -> None:
    # Given a publish that fails once: it may have stored the messages anyway
    broker = FakeBroker(failures=1)
    publisher = Publisher(broker.publish, RetryPolicy(max_retries=1, interval_start=0))
    with anyio.fail_after(1):
        await asyncio.gather(publisher.submit(envelope(0)), publisher.submit(envelope(1)))
    # Then the retry sends them marked, so that a worker checks they did not run already
    assert broker.resent == [[False, False], [True, True]]


async def test_exhausted_retries_fail_every_send_of_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(failures=10)
    publisher = Publisher(broker.publish, RetryPolicy(max_retries=2, interval_start=0, interval_step=0.01))
    futures = [publisher.submit(envelope(n)) for n in range(2)]
    for future in futures:
        with anyio.fail_after(1), pytest.raises(OperationalError, match="down"):
            await future
    # One try and two retries, and the failure was logged
    assert len(broker.calls) == 3
    assert "Failed to publish 2 task(s)" in caplog.text


async def test_other_errors_are_not_retried() -> None:
    broker = FakeBroker(failures=1, error=ValueError("bad"))
    publisher = Publisher(broker.publish, RetryPolicy())
    with anyio.fail_after(1), pytest.raises(ValueError, match="bad"):
        await publisher.submit(envelope(0))
    assert len(broker.calls) == 1


async def test_without_a_policy_there_is_no_retry() -> None:
    broker = FakeBroker(failures=1)
    publisher = Publisher(broker.publish)
    with anyio.fail_after(1), pytest.raises(OperationalError):
        await publisher.submit(envelope(0))
    assert len(broker.calls) == 1


async def test_a_failed_send_nobody_awaits_does_not_warn() -> None:
    # Given a failing send whose future is dropped (warnings are errors in this suite)
    publisher = Publisher(FakeBroker(failures=1).publish)
    publisher.submit(envelope(0))
    # When the publisher drains, then nothing is raised or warned
    with anyio.fail_after(1):
        await publisher.drain()


async def test_drain_waits_for_every_flush() -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def slow(envelopes: Sequence[Envelope]) -> None:
        await release.wait()
        done.extend(e.id for e in envelopes)

    publisher = Publisher(slow)
    publisher.submit(envelope(0))
    asyncio.get_running_loop().call_later(0.05, release.set)
    with anyio.fail_after(1):
        await publisher.drain()
    assert done == ["id-0"]


def test_submit_outside_an_event_loop_explains() -> None:
    publisher = Publisher(FakeBroker().publish)
    with pytest.raises(AqueueError, match="inside a running event loop"):
        publisher.submit(envelope(0))


def test_retry_policy_intervals_follow_celerys_settings() -> None:
    assert RetryPolicy().intervals == (0.0, 0.2, 0.2)
    assert RetryPolicy(max_retries=4, interval_start=1, interval_step=0.5, interval_max=2).intervals == (
        1.0,
        1.5,
        2.0,
        2.0,
    )
    assert RetryPolicy(max_retries=0).intervals == ()
