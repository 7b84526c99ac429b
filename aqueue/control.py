"""The client side of remote control: Celery's pidbox protocol, replies gathered for a bounded time.

A command is a JSON request sent to the fanout exchange ``<control_exchange>.pidbox``: ``method``,
``arguments``, ``destination`` (worker names, or null for all), ``pattern`` and ``matcher``, and, when
replies are wanted, ``ticket`` and ``reply_to`` (the direct exchange ``reply.<control_exchange>.pidbox``
and this call's own routing key). Its headers carry ``clock`` and ``expires``. Each worker answers with
``{<its name>: <reply>}`` and the ticket in the headers. This is what ``celery inspect``/``celery control``
and Flower send, so they reach aqueue workers, and aqueue reaches Celery workers, on Redis and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener
from aqueue.events import CLOCK
from aqueue.rates import parse_rate

if TYPE_CHECKING:
    from aqueue.app import App
    from aqueue.config import Settings

__all__ = ["Control", "Mailbox", "Replies", "as_reply"]

logger = logging.getLogger("aqueue.control")

Replies = list[dict[str, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Mailbox:
    """The exchanges and queues of Celery's pidbox for one ``control_exchange``, as Celery declares them."""

    namespace: str = "celery"
    queue_ttl: float | None = 300.0
    queue_expires: float | None = 10.0

    @classmethod
    def of(cls, conf: Settings) -> Mailbox:
        return cls(conf.control_exchange, conf.control_queue_ttl, conf.control_queue_expires)

    @property
    def exchange(self) -> Exchange:
        """Where requests go: every worker of the namespace reads it."""
        return Exchange(f"{self.namespace}.pidbox", "fanout")

    @property
    def reply_exchange(self) -> Exchange:
        return Exchange(f"reply.{self.namespace}.pidbox", "direct")

    def node(self, hostname: str) -> Listener:
        """The queue a worker named ``hostname`` reads requests from."""
        return Listener(f"{hostname}.{self.namespace}.pidbox", "", self.queue_ttl, self.queue_expires)

    def replies(self, oid: str) -> Listener:
        """The queue one caller reads its replies from."""
        name = f"{oid}.{self.reply_exchange.name}"
        return Listener(name, oid, self.queue_ttl, self.queue_expires)


def as_reply(value: Any) -> dict[str, Any]:
    """A worker's reply as ``{'ok': ...}`` or ``{'error': ...}`` (Celery's inspect replies are bare values)."""
    if isinstance(value, dict) and len(value) == 1 and ("ok" in value or "error" in value):
        return value
    return {"ok": value}


class Control:
    """``app.control``: commands for every worker of the app (or those named in ``destination``)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def broadcast(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = True,
        timeout: float = 1.0,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> Replies:
        """Send ``command`` to the workers; returns ``[{worker_name: reply}, ...]`` received in ``timeout`` s.

        Each reply is ``{'ok': value}`` or ``{'error': text}``. ``pattern`` (with ``matcher``: ``glob``, the
        default, or ``pcre``) picks workers by name, as Celery's.
        """
        app = self.app
        await app.connect()
        mailbox = Mailbox.of(app.conf)
        request: dict[str, Any] = {
            "method": command,
            "arguments": arguments or {},
            "destination": list(destination) if destination else None,
            "pattern": pattern,
            "matcher": matcher,
        }
        if not reply:
            await self._send(mailbox, request, timeout)
            return []
        oid, ticket = str(uuid.uuid4()), str(uuid.uuid4())
        request["ticket"] = ticket
        request["reply_to"] = {"exchange": mailbox.reply_exchange.name, "routing_key": oid}
        async with app.broker.bind_exchange(mailbox.reply_exchange, mailbox.replies(oid)) as inbox:
            await self._send(mailbox, request, timeout)
            return await _gather(inbox, ticket, timeout, limit or (len(destination) if destination else None))

    async def _send(self, mailbox: Mailbox, request: dict[str, Any], timeout: float) -> None:
        headers = {"clock": CLOCK.forward(), "expires": time.time() + timeout}
        message = ExchangeMessage(pydantic_core.to_json(request), headers, delivery_mode=2)
        await self.app.broker.send_to_exchange(mailbox.exchange, message)

    async def rate_limit(self, task_name: str, rate_limit: str, **options: Any) -> Replies:
        """Set a task's rate limit on the workers (``'10/m'``; ``'0'`` or ``None`` removes it)."""
        parse_rate(rate_limit)
        return await self.broadcast(
            "rate_limit", {"task_name": task_name, "rate_limit": rate_limit}, **options
        )

    async def ping(self, **options: Any) -> Replies:
        return await self.broadcast("ping", **options)

    async def revoke(self, task_id: str | Sequence[str], **options: Any) -> Replies:
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return await self.broadcast("revoke", {"task_id": ids}, **options)

    async def enable_events(self, **options: Any) -> Replies:
        """Have the workers send task events (as ``worker -E``), as Flower asks."""
        return await self.broadcast("enable_events", **options)

    async def disable_events(self, **options: Any) -> Replies:
        return await self.broadcast("disable_events", **options)

    async def inspect(self, what: str, **options: Any) -> Replies:
        """``registered``, ``active``, ``stats``, ``active_queues``, ``revoked``, ``conf``, ... of every worker."""
        return await self.broadcast(what, **options)


async def _gather(
    inbox: AsyncIterator[ExchangeMessage], ticket: str, timeout: float, limit: int | None
) -> Replies:
    replies: Replies = []

    async def collect() -> None:
        async for message in inbox:
            if message.headers.get("ticket") != ticket:
                continue
            clock = message.headers.get("clock")
            if isinstance(clock, int):
                CLOCK.adjust(clock)
            try:
                body = pydantic_core.from_json(message.body)
            except ValueError as exc:
                logger.warning("Ignoring a reply that is not JSON: %s", exc)
                continue
            if isinstance(body, dict):
                replies.extend({name: as_reply(value)} for name, value in body.items())
            if limit is not None and len(replies) >= limit:
                return

    try:
        await asyncio.wait_for(collect(), max(0.0, timeout))
    except TimeoutError:
        pass
    return replies
