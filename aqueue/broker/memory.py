"""memory:// — an in-process broker. Every ``memory://NAME`` URL in one process shares one store.

It is a real implementation (queues, ETA, dead letters, broadcast), and the one unit tests use.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit

from aqueue.broker.base import Broker, Consumer, Delivery
from aqueue.message import Envelope
from aqueue.rates import Rate, Tokens

__all__ = ["MemoryBroker"]


class _Store:
    def __init__(self) -> None:
        self.queues: defaultdict[str, deque[tuple[Envelope, bool]]] = defaultdict(deque)
        self.delayed: list[tuple[float, int, Envelope]] = []
        self.dead: defaultdict[str, list[Envelope]] = defaultdict(list)
        self.channels: defaultdict[str, set[asyncio.Queue[bytes]]] = defaultdict(set)
        self.waiters: set[asyncio.Future[None]] = set()
        self.seq = itertools.count()
        self.buckets: dict[str, Tokens] = {}
        self.marks: dict[str, float] = {}

    def put(self, envelope: Envelope, redelivered: bool = False, front: bool = False) -> None:
        if envelope.eta is not None and envelope.eta > time.time():
            heapq.heappush(self.delayed, (envelope.eta, next(self.seq), envelope))
        elif front:
            self.queues[envelope.queue].appendleft((envelope, redelivered))
        else:
            self.queues[envelope.queue].append((envelope, redelivered))
        if self.waiters:
            self.wake()

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    async def wait(self, timeout: float | None) -> None:
        """Until something is put, or ``timeout`` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.add(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            self.waiters.discard(waiter)
            if timer is not None:
                timer.cancel()

    def move_due(self) -> float | None:
        """Move due delayed envelopes to their queues; returns seconds until the next one."""
        if not self.delayed:
            return None
        now = time.time()
        while self.delayed and self.delayed[0][0] <= now:
            envelope = heapq.heappop(self.delayed)[2]
            self.queues[envelope.queue].append((envelope, False))
        return self.delayed[0][0] - now if self.delayed else None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_STORES: defaultdict[str, _Store] = defaultdict(_Store)


class MemoryBroker(Broker):
    """A broker living in this process's memory."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.store = _STORES[urlsplit(url).netloc]

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            self.store.put(envelope)

    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return _MemoryConsumer(self.store, queues, prefetch)

    async def purge(self, queue: str) -> int:
        waiting = self.store.queues.pop(queue, deque())
        before = len(self.store.delayed)
        self.store.delayed = [item for item in self.store.delayed if item[2].queue != queue]
        heapq.heapify(self.store.delayed)
        return len(waiting) + before - len(self.store.delayed)

    async def dead_letters(self, queue: str) -> list[Envelope]:
        """Envelopes rejected from ``queue``."""
        return list(self.store.dead[queue])

    async def take_token(self, key: str, rate: Rate) -> float:
        tokens = self.store.buckets.get(key)
        if tokens is None:
            tokens = self.store.buckets[key] = Tokens(rate)
        elif tokens.rate != rate:
            tokens.set_rate(rate)
        return tokens.take()

    async def advance(self, key: str, value: float) -> float | None:
        previous = self.store.marks.get(key)
        if previous is None or previous < value:
            self.store.marks[key] = value
        return previous

    async def broadcast(self, channel: str, data: bytes) -> None:
        for subscriber in self.store.channels[channel]:
            subscriber.put_nowait(data)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        with self._subscribed(channel, inbox):
            yield _drain(inbox)

    @contextmanager
    def _subscribed(self, channel: str, inbox: asyncio.Queue[bytes]) -> Iterator[None]:
        self.store.channels[channel].add(inbox)
        try:
            yield
        finally:
            self.store.channels[channel].discard(inbox)


async def _drain(inbox: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
    while True:
        yield await inbox.get()


class _MemoryConsumer(Consumer):
    def __init__(self, store: _Store, queues: Sequence[str], prefetch: int) -> None:
        super().__init__(queues, prefetch)
        self.store = store

    async def _fetch(self, n: int) -> Sequence[Delivery]:
        store = self.store
        while True:
            next_due = store.move_due()
            out: list[Delivery] = []
            for queue in self.queues:
                waiting = store.queues.get(queue)
                while waiting and len(out) < n:
                    envelope, redelivered = waiting.popleft()
                    out.append(
                        Delivery(
                            self,
                            envelope.id,
                            queue,
                            envelope.body,
                            envelope.content_type,
                            redelivered,
                            envelope,
                        )
                    )
            if out:
                return out
            await store.wait(next_due)

    async def _ack(self, delivery: Delivery) -> None:
        pass

    async def _reject(self, delivery: Delivery) -> None:
        self.store.dead[delivery.queue].append(delivery.tag)

    async def _requeue(self, delivery: Delivery) -> None:
        self.store.put(delivery.tag, redelivered=True, front=True)
