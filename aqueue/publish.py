"""Publishing started at ``delay()``: messages sent in one loop turn go to the broker as one batch.

``delay()`` encodes the message at once (so a bad argument raises there) and hands the envelope to
the app's :class:`Publisher`, which returns a future; the result's ``await`` waits on that future.

A batch that fails is retried per ``task_publish_retry_policy``. A failure does not say whether the
broker stored the batch (a connection cut before the reply, lost confirms), so retried envelopes are
marked ``resent``: the broker delivers them as redeliveries, and a worker runs such a copy only when
the task is neither running in it nor finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from aqueue.exceptions import AqueueError, OperationalError
from aqueue.message import Envelope

__all__ = ["Publisher", "RetryPolicy"]

logger = logging.getLogger("aqueue.publish")


class RetryPolicy:
    """Celery's ``task_publish_retry_policy``: how often and how long to retry a failed publish."""

    def __init__(
        self,
        max_retries: float = 3,
        interval_start: float = 0.0,
        interval_step: float = 0.2,
        interval_max: float = 0.2,
    ) -> None:
        self.max_retries, self.start, self.step, self.max = (
            int(max_retries),
            interval_start,
            interval_step,
            interval_max,
        )

        self.intervals: tuple[float, ...] = tuple(
            min(self.start + i * self.step, self.max) for i in range(self.max_retries)
        )
        """The pause before each retry."""


class Publisher:
    """Coalesces the envelopes submitted in one event-loop turn into one ``broker.publish`` call."""

    def __init__(
        self, publish: Callable[[Sequence[Envelope]], Awaitable[None]], retry: RetryPolicy | None = None
    ) -> None:
        self._publish, self._retry = publish, retry
        self._pending: list[tuple[Envelope, asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    def submit(self, envelope: Envelope) -> asyncio.Future[None]:
        """Queue ``envelope`` for the next flush; the future completes when the broker accepted it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise AqueueError(
                "delay() and apply_async() must be called inside a running event loop "
                "(from async code, or under asyncio.run())."
            ) from None
        future = loop.create_future()
        if not self._pending:
            flush = loop.create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        self._pending.append((envelope, future))
        return future

    async def drain(self) -> None:
        """Wait until every submitted envelope has been published (or has failed)."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def _flush(self) -> None:
        # This task's first step runs after the rest of the loop turn that submitted the first envelope.
        batch, self._pending = self._pending, []
        try:
            await self._send([envelope for envelope, _ in batch])
        except BaseException as exc:
            logger.error("Failed to publish %d task(s): %s", len(batch), exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # logged above: no "exception never retrieved" at collection
            if not isinstance(exc, Exception):
                raise
        else:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _send(self, envelopes: list[Envelope]) -> None:
        intervals = self._retry.intervals if self._retry else ()
        for attempt in range(len(intervals) + 1):
            try:
                return await self._publish(envelopes)
            except OperationalError as exc:
                if attempt == len(intervals):
                    raise
                logger.warning("Publish failed (%s); retrying in %.1fs", exc, intervals[attempt])
                await asyncio.sleep(intervals[attempt])
                # The failed attempt may have stored some of them: mark the copies, so that a worker
                # checks that the task is neither running nor finished before it runs one.
                envelopes = [replace(e, resent=True) for e in envelopes]
