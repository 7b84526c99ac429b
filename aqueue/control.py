"""The client side of remote control: broadcast a command, gather replies for a bounded time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue.rates import parse_rate

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["Control"]

Replies = list[dict[str, dict[str, Any]]]


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
    ) -> Replies:
        """Send ``command`` to the workers; returns ``[{worker_name: reply}, ...]`` received in ``timeout`` s."""
        app = self.app
        await app.connect()
        channel = f"{app.conf.control_exchange}.control"
        ticket = uuid.uuid4().hex
        reply_to = f"{app.conf.control_exchange}.reply.{ticket}"
        request: dict[str, Any] = {
            "command": command,
            "arguments": arguments or {},
            "destination": list(destination or []),
            "ticket": ticket,
            "reply_to": reply_to if reply else None,
        }
        if not reply:
            await app.broker.broadcast(channel, pydantic_core.to_json(request))
            return []
        async with app.broker.subscribe(reply_to) as inbox:
            await app.broker.broadcast(channel, pydantic_core.to_json(request))
            return await _gather(inbox, ticket, timeout, limit or (len(destination) if destination else None))

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

    async def inspect(self, what: str, **options: Any) -> Replies:
        """``registered``, ``active`` or ``stats`` of every worker."""
        return await self.broadcast(what, **options)


async def _gather(inbox: Any, ticket: str, timeout: float, limit: int | None) -> Replies:
    replies: Replies = []
    deadline = time.monotonic() + timeout

    async def collect() -> None:
        async for raw in inbox:
            data = pydantic_core.from_json(raw)
            if data.get("ticket") == ticket:
                replies.append({data["hostname"]: data["reply"]})
                if limit is not None and len(replies) >= limit:
                    return

    try:
        await asyncio.wait_for(collect(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        pass
    return replies
