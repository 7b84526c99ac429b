"""How aqueue lays out its queues on RabbitMQ, and declares them: as Celery does.

Messages are Celery's message protocol v2 (:mod:`aqueue.protocol`): Celery clients and workers on the
same RabbitMQ send to and run from the same queues. The layout and the declarations are Celery's too,
so that neither side's declaration fails on a queue the other made: a queue ``X`` is durable, declared
with the arguments a Celery app with the same settings gives it (none by default; ``x-max-priority``,
``x-queue-type`` from :mod:`aqueue.queues`), and bound to a durable direct exchange ``X`` with routing
key ``X``; messages are persistent and published, as Celery publishes them, through the default
exchange with the queue's name as routing key. A queue that already exists with other arguments is
used as it is, with a warning. Dead letters (``reject()``) are published to the queue ``X.dead`` (of
``X``'s type, with no other arguments), and the original is acknowledged once RabbitMQ confirmed the
copy: at least once on every queue type, and no queue argument that Celery does not declare.
Everything is declared on first use and remembered. Broadcasts go through one durable direct
exchange, ``aqueue.broadcast``, with the channel name as routing key; each subscriber binds an
exclusive auto-delete queue to it. (An exchange per channel would outlive the one-off reply
channels of remote control; the routing key gives the same fan-out and leaves nothing behind.)

Quorum queues (``x-queue-type: quorum``) take no global QoS, which aqueue never asks for (each
consumer's prefetch is its own), so one worker consumes classic and quorum queues together. RabbitMQ
3.x quorum queues have no priorities: ``x-max-priority`` is left out of their declaration (with a
warning), and the priority of their messages is ignored by the server.

ETA and countdown are held by RabbitMQ, not by the worker, so a flood of ETA tasks never fills the
prefetch window and never meets RabbitMQ's acknowledgement timeout (``consumer_timeout``). A message
due in ``d`` ms goes to the delay queue ``X.delay.<b>``, where ``b`` is ``d`` rounded *down* to its
four leading bits (at most 1/8 below ``d``; 64 ms when ``d`` is smaller; 2**31 ms at most). A delay
queue has one queue-wide TTL ``b``, so messages expire in arrival order (a per-message TTL would only
expire at the head of the queue), and dead-letters to exchange ``X``. The consumer reads the message's
due time from its ``eta`` header: a message that arrives early is published again for the time left
(at most 1/8 of the previous wait) and acknowledged, so a message is never handed out early and is
late by at most 64 ms plus one hop. Delay queues expire (``x-expires``) when unused; they are declared
again before that lease runs out. ``purge(X)`` also empties the delay queues of ``X`` that this broker
object declared. The delay queues of a quorum queue are quorum queues that dead-letter at least once
(``x-dead-letter-strategy``); those of a classic queue are classic, and RabbitMQ dead-letters from a
classic queue at most once, so a broker crash at the moment a delay ends may lose that message. A
Celery message whose ``eta`` has not come yet takes the same way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from aqueue.queues import QueueDeclarations, is_quorum

__all__ = ["Layout", "delay_bucket_ms"]

log = logging.getLogger("aqueue.broker.amqp")

_BROADCAST = "aqueue.broadcast"
_MIN_DELAY_MS = 64
_MAX_DELAY_MS = 2**31
_BUCKET_BITS = 4
_DELAY_LEASE_MS = 600_000
"""How long an unused delay queue outlives its TTL before RabbitMQ deletes it."""
_AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def delay_bucket_ms(seconds: float) -> int:
    """The delay queue TTL (ms) for a message due in ``seconds``: never above it, except the 64 ms floor."""
    ms = math.ceil(seconds * 1000)
    if ms <= _MIN_DELAY_MS:
        return _MIN_DELAY_MS
    shift = ms.bit_length() - _BUCKET_BITS
    return min((ms >> shift) << shift, _MAX_DELAY_MS)


class Layout:
    """The queues and exchanges one broker object has declared, each declared once (see the module docstring).

    ``scratch`` opens a short-lived channel: a refused declaration closes the channel it happens on.
    """

    def __init__(
        self,
        declarations: QueueDeclarations,
        scratch: Callable[[], AbstractAsyncContextManager[AbstractChannel]],
    ) -> None:
        self.declarations, self._scratch = declarations, scratch
        self.queues: dict[str, dict[str, Any] | None] = {}
        """The arguments each queue was declared with; None: it existed with others, and is used as it is."""
        self.delays: dict[str, dict[int, float]] = {}
        """Each queue's delay queues: TTL in ms -> when declared (monotonic)."""
        self._broadcast = False
        self._lock = asyncio.Lock()

    def forget(self, queue: str | None = None) -> None:
        """Declare ``queue`` (or everything, after a reconnect) again on next use."""
        if queue is None:
            self.queues.clear()
            self.delays.clear()
            self._broadcast = False
        else:
            self.queues.pop(queue, None)
            self.delays.pop(queue, None)

    def delay_queues(self, queue: str) -> list[str]:
        """The names of the delay queues of ``queue`` that were declared here."""
        return [f"{queue}.delay.{ttl}" for ttl in self.delays.get(queue, ())]

    async def queue(self, queue: str) -> dict[str, Any] | None:
        """Declare ``queue``, its exchange and dead-letter queue once; None: it exists with other arguments."""
        if queue in self.queues:
            return self.queues[queue]
        async with self._lock:
            if queue not in self.queues:
                self.queues[queue] = await self._declare_queue(queue)
        return self.queues[queue]

    async def _declare_queue(self, queue: str) -> dict[str, Any] | None:
        arguments = self.declarations.arguments(queue)
        if is_quorum(arguments) and arguments.pop("x-max-priority", None) is not None:
            log.warning(
                "Queue %r is a quorum queue: RabbitMQ 3 has no priorities on those; declared without", queue
            )
        dead = {"x-queue-type": "quorum"} if is_quorum(arguments) else None
        async with self._scratch() as channel:
            await channel.declare_exchange(queue, aio_pika.ExchangeType.DIRECT, durable=True)
        await self._declare(f"{queue}.dead", dead)
        declared = await self._declare(queue, arguments, bind=queue)
        return arguments if declared else None

    async def _declare(self, name: str, arguments: dict[str, Any] | None, bind: str | None = None) -> bool:
        """Declare durable queue ``name``; False when it exists with other arguments (it is used as it is)."""
        try:
            async with self._scratch() as channel:
                declared = await channel.declare_queue(name, durable=True, arguments=arguments)
                if bind is not None:
                    await declared.bind(bind, name)
            return True
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning(
                "Queue %r exists with other arguments than %s; using it as it is: %s",
                name,
                arguments or "none",
                exc,
            )
        async with self._scratch() as channel:
            declared = await channel.declare_queue(name, passive=True)
            if bind is not None:
                await declared.bind(bind, name)
        return False

    async def delay_queue(self, queue: str, ttl_ms: int) -> str:
        """The delay queue of ``queue`` with TTL ``ttl_ms``, declared (again, before its lease runs out)."""
        name = f"{queue}.delay.{ttl_ms}"
        declared = self.delays.setdefault(queue, {})
        # RabbitMQ's x-expires lease is renewed by a declare, not by a publish.
        if time.monotonic() - declared.get(ttl_ms, -math.inf) < _DELAY_LEASE_MS / 2000:
            return name
        arguments: dict[str, Any] = {"x-message-ttl": ttl_ms, "x-expires": ttl_ms + _DELAY_LEASE_MS}
        arguments |= {"x-dead-letter-exchange": queue, "x-dead-letter-routing-key": queue}
        if is_quorum(self.queues.get(queue)):
            arguments |= {"x-queue-type": "quorum", **_AT_LEAST_ONCE}
        await self._declare(name, arguments)
        declared[ttl_ms] = time.monotonic()
        return name

    async def broadcast_exchange(self) -> str:
        """The exchange of broadcasts, declared once."""
        if not self._broadcast:
            async with self._scratch() as channel:
                await channel.declare_exchange(_BROADCAST, aio_pika.ExchangeType.DIRECT, durable=True)
            self._broadcast = True
        return _BROADCAST
