"""The broker seam: what every transport implements.

A :class:`Broker` publishes envelopes and hands out a :class:`Consumer`, an async iterator of
:class:`Delivery`. The consumer keeps at most ``prefetch`` deliveries unsettled; each delivery is
settled exactly once by ``ack()``, ``reject()`` (dead-letter) or ``requeue()``. Brokers also carry
broadcasts (``broadcast`` / ``subscribe``), and Celery's exchanges for monitoring events and remote
control (``send_to_exchange`` / ``bind_exchange``, see :mod:`aqueue.broker.exchange`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Self

from aqueue._compat import AsyncResource
from aqueue.broker.exchange import (
    Exchange,
    ExchangeMessage,
    Listener,
    bind_over_broadcast,
    send_over_broadcast,
)
from aqueue.message import NATIVE, Codec, Envelope
from aqueue.rates import Rate

__all__ = ["Broker", "Consumer", "Delivery"]


class Delivery:
    """One message handed to a consumer, to be settled once."""

    __slots__ = (
        "_consumer", "body", "content_type", "headers", "id", "properties", "queue", "redelivered",
        "settled", "tag",
    )  # fmt: skip

    def __init__(
        self,
        consumer: Consumer,
        id: str,
        queue: str,
        body: bytes,
        content_type: str,
        redelivered: bool = False,
        tag: Any = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        self._consumer = consumer
        self.id, self.queue, self.body, self.content_type = id, queue, body, content_type
        self.redelivered, self.tag, self.settled = redelivered, tag, False
        self.headers = headers
        """The headers carried beside the body, for the broker's codec (``None`` on native layouts)."""
        self.properties = properties
        """The wire's own fields for the codec (``reply_to``, ``priority``; ``None`` on native layouts)."""

    async def ack(self) -> None:
        """The message is done with: remove it from the broker.

        Raises:
            DeliveryLost: the delivery went with its connection; the broker delivers the message again.
        """
        if self._settle():
            await self._consumer._ack(self)

    async def reject(self) -> None:
        """The message must never run: dead-letter it."""
        if self._settle():
            await self._consumer._reject(self)

    async def requeue(self) -> None:
        """Give the message back so that any consumer may receive it again."""
        if self._settle():
            await self._consumer._requeue(self)

    def drop(self) -> None:
        """Forget a lost delivery without telling the broker, which has it back already."""
        self._settle()

    @property
    def lost(self) -> bool:
        """Whether the delivery went with its connection (the broker has it back and sends it again)."""
        return not self.settled and self._consumer._lost(self)

    def _settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        self._consumer._release(self)
        return True

    def __repr__(self) -> str:
        return f"<Delivery {self.id} queue={self.queue!r}>"


class Consumer(ABC):
    """Deliveries from some queues, at most ``prefetch`` of them unsettled at once.

    Subclasses implement ``_fetch`` (wait for up to ``n`` deliveries) and the three settle steps.
    """

    def __init__(self, queues: Sequence[str], prefetch: int) -> None:
        self.queues, self.prefetch = tuple(queues), max(1, prefetch)
        self.held: dict[int, Delivery] = {}
        self._buffer: deque[Delivery] = deque()
        self._room = asyncio.Event()
        self._room.set()

    async def receive(self) -> Delivery:
        """The next delivery; waits while ``prefetch`` deliveries are unsettled."""
        while True:
            while not self._buffer:
                while len(self.held) >= self.prefetch:
                    self._room.clear()
                    await self._room.wait()
                for delivery in await self._fetch(self.prefetch - len(self.held)):
                    self.held[id(delivery)] = delivery
                    self._buffer.append(delivery)
            delivery = self._buffer.popleft()
            if not self._lost(delivery):
                return delivery
            delivery.drop()

    def _lost(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` went with its connection since it was fetched (the broker sends it again)."""
        return False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delivery:
        return await self.receive()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop consuming; requeue deliveries fetched but never handed out."""
        while self._buffer:
            await self._buffer.popleft().requeue()

    def _release(self, delivery: Delivery) -> None:
        self.held.pop(id(delivery), None)
        self._room.set()

    @abstractmethod
    async def _fetch(self, n: int) -> Sequence[Delivery]:
        """Wait for, claim and return between 0 and ``n`` deliveries (0 lets the loop re-check)."""

    @abstractmethod
    async def _ack(self, delivery: Delivery) -> None: ...

    @abstractmethod
    async def _reject(self, delivery: Delivery) -> None: ...

    @abstractmethod
    async def _requeue(self, delivery: Delivery) -> None: ...


class Broker(AsyncResource, ABC):
    """A message transport. Use it as ``async with broker:`` or call ``connect()``/``aclose()``."""

    url: str
    codec: Codec = NATIVE
    """How messages are laid out on this broker's wire."""

    @abstractmethod
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store ``envelopes`` in their queues; returns once the broker has accepted all of them.

        An envelope with an ``eta`` is not delivered before that time. Publishing declares the queue.

        Raises:
            OperationalError: the broker could not be reached or refused the messages.
        """

    @abstractmethod
    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        """A consumer of ``queues`` holding at most ``prefetch`` unsettled deliveries."""

    @abstractmethod
    async def purge(self, queue: str) -> int:
        """Delete every waiting message of ``queue``; returns how many were deleted."""

    async def dead_letters(self, queue: str) -> list[Envelope]:
        """The envelopes rejected from ``queue`` (undecodable, refused, unregistered), oldest first.

        For inspection; they stay where they are. Transports that cannot list them raise NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list dead letters")

    async def take_token(self, key: str, rate: Rate) -> float:
        """Take a token from the bucket ``key`` shared by every worker of this broker (``global_rate_limit``).

        Returns 0 when a token was taken, else the seconds until one is due (nothing is taken).
        Transports without a store every worker shares raise NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} has no rate-limit store shared by its workers")

    async def advance(self, key: str, value: float) -> float | None:
        """Raise the mark ``key``, shared by every process of this broker, to ``value`` if below it (atomic).

        Returns the mark as it was: None when unset (now set), at or above ``value`` when left alone. Beat
        sends a due time only when its call moved the mark. Without a shared store: NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} has no store its processes share for marks")

    @abstractmethod
    async def broadcast(self, channel: str, data: bytes) -> None:
        """Send ``data`` to every current subscriber of ``channel`` (remote control)."""

    @abstractmethod
    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Receive what is broadcast on ``channel`` from the moment the context is entered."""

    async def send_to_exchange(self, exchange: Exchange, message: ExchangeMessage) -> None:
        """Send ``message`` to a Celery exchange (monitoring events, remote control).

        This default carries it over :meth:`broadcast`; Redis and RabbitMQ lay it out as kombu does.
        """
        await send_over_broadcast(self, exchange, message)

    def bind_exchange(
        self, exchange: Exchange, listener: Listener
    ) -> AbstractAsyncContextManager[AsyncIterator[ExchangeMessage]]:
        """Receive what ``exchange`` routes to ``listener`` from the moment the context is entered."""
        return bind_over_broadcast(self, exchange, listener)

    def __repr__(self) -> str:
        from aqueue.urls import mask_password

        return f"<{type(self).__name__} {mask_password(self.url)}>"

    __str__ = __repr__
