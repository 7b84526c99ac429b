"""The worker's remote-control command table: ping, registered, active, stats, rate_limit, revoke."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue.exceptions import InvalidRate
from aqueue.rates import parse_rate

if TYPE_CHECKING:
    from aqueue.worker.worker import Worker

__all__ = ["ControlServer"]

logger = logging.getLogger("aqueue.worker")

Handler = Callable[["Worker", dict[str, Any]], Awaitable[dict[str, Any]]]
COMMANDS: dict[str, Handler] = {}


def command(fn: Handler) -> Handler:
    COMMANDS[fn.__name__.removeprefix("_")] = fn
    return fn


@command
async def _ping(worker: Worker, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"ok": "pong"}


@command
async def _registered(worker: Worker, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"ok": sorted(name for name in worker.runtimes if name not in worker.app.builtins)}


@command
async def _active(worker: Worker, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"ok": worker.state.describe_active()}


@command
async def _stats(worker: Worker, arguments: dict[str, Any]) -> dict[str, Any]:
    stats = asdict(worker.state.statistics())
    stats["pool"] = asdict(worker.slots.statistics())
    return {"ok": stats}


@command
async def _rate_limit(worker: Worker, arguments: dict[str, Any]) -> dict[str, Any]:
    name, rate = arguments.get("task_name"), arguments.get("rate_limit")
    runtime = worker.runtimes.get(str(name))
    if runtime is None:
        return {"error": f"unknown task {name!r}"}
    try:
        runtime.bucket.set_rate(parse_rate(rate))
    except InvalidRate as exc:
        return {"error": str(exc)}
    logger.info("New rate limit for tasks of type %s: %s.", name, rate)
    return {"ok": "new rate limit set successfully"}


@command
async def _revoke(worker: Worker, arguments: dict[str, Any]) -> dict[str, Any]:
    ids = arguments.get("task_id") or []
    ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
    worker.state.revoke(ids)
    return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}


class ControlServer:
    """Answers broadcast commands addressed to this worker (or to every worker)."""

    def __init__(self, worker: Worker, channel: str) -> None:
        self.worker, self.channel = worker, channel

    async def serve(self, inbox: AsyncIterator[bytes]) -> None:
        async for raw in inbox:
            try:
                request = pydantic_core.from_json(raw)
                await self._answer(request)
            except Exception as exc:
                logger.warning("Ignoring a bad control message: %s", exc)

    async def _answer(self, request: dict[str, Any]) -> None:
        destination = request.get("destination")
        if destination and {self.worker.hostname, *self.worker.aliases}.isdisjoint(destination):
            return
        handler = COMMANDS.get(request.get("command", ""))
        reply = (
            await handler(self.worker, request.get("arguments") or {})
            if handler
            else {"error": f"unknown command {request.get('command')!r}"}
        )
        if request.get("reply_to"):
            payload = {"hostname": self.worker.hostname, "ticket": request.get("ticket"), "reply": reply}
            await self.worker.app.broker.broadcast(request["reply_to"], pydantic_core.to_json(payload))
