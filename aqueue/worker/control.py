"""The worker's side of remote control: Celery's pidbox commands, answered as a Celery worker answers them.

Inspect commands reply with bare values in Celery's shapes (``stats`` a dict, ``active`` a list of
requests, ...), control commands with ``{'ok': ...}`` or ``{'error': ...}``; so ``celery inspect``,
``celery control`` and Flower read an aqueue worker as they read a Celery one. A command that raises
replies ``{'error': ...}``; a message that is not a request is logged and ignored.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue.broker.exchange import Exchange, ExchangeMessage
from aqueue.events import CLOCK, safe_repr
from aqueue.exceptions import InvalidRate
from aqueue.message import Message
from aqueue.rates import parse_rate
from aqueue.urls import mask_password

if TYPE_CHECKING:
    from aqueue.broker.base import Delivery
    from aqueue.worker.worker import Worker

__all__ = ["COMMANDS", "ControlServer"]

REPLY_TIMEOUT = 5.0
"""Seconds a remote control reply may take to publish before it is dropped."""

logger = logging.getLogger("aqueue.worker")

Handler = Callable[["Worker", dict[str, Any]], Awaitable[Any]]
COMMANDS: dict[str, Handler] = {}
"""Command name -> handler(worker, arguments); the reply is what the handler returns."""

_HIDDEN = re.compile("API|TOKEN|KEY|SECRET|PASS|SIGNATURE|DATABASE", re.IGNORECASE)
"""Settings whose values ``conf`` hides, as Celery's."""


def command(fn: Handler) -> Handler:
    COMMANDS[fn.__name__.removeprefix("_")] = fn
    return fn


# Inspect --------------------------------------------------------------------------------------------


@command
async def _ping(worker: Worker, arguments: dict[str, Any]) -> Any:
    return {"ok": "pong"}


@command
async def _registered(worker: Worker, arguments: dict[str, Any]) -> Any:
    return [
        f"{name} [rate_limit={runtime.bucket.rate}]" if runtime.bucket.rate else name
        for name, runtime in sorted(worker.runtimes.items())
        if name not in worker.app.builtins
    ]


@command
async def _active(worker: Worker, arguments: dict[str, Any]) -> Any:
    safe = bool(arguments.get("safe"))
    return [request_info(worker, m, d, started, safe) for m, started, d in worker.state.active.values()]


@command
async def _reserved(worker: Worker, arguments: dict[str, Any]) -> Any:
    return [request_info(worker, message, delivery) for delivery, message, _ in worker.slots.queued()]


@command
async def _scheduled(worker: Worker, arguments: dict[str, Any]) -> Any:
    return []  # countdown and ETA messages wait in the broker, not in the worker


@command
async def _revoked(worker: Worker, arguments: dict[str, Any]) -> Any:
    return sorted(worker.state.revoked)


@command
async def _query_task(worker: Worker, arguments: dict[str, Any]) -> Any:
    ids = arguments.get("ids") or []
    active = worker.state.active
    return {
        task_id: ["active", request_info(worker, *_reordered(active[task_id]))]
        for task_id in ([ids] if isinstance(ids, str) else ids)
        if task_id in active
    }


@command
async def _stats(worker: Worker, arguments: dict[str, Any]) -> Any:
    state, slots = worker.state.statistics(), worker.slots
    pool = {
        "implementation": "aqueue (asyncio)",
        "max-concurrency": slots.limit,
        "processes": [os.getpid()],
        "max-tasks-per-child": "N/A",
        "put-guarded-by-semaphore": False,
        "timeouts": [0, 0],
        **asdict(slots.statistics()),
    }
    return {
        "total": state.total,
        "pid": os.getpid(),
        "clock": str(CLOCK.value),
        "uptime": round(state.uptime),
        "pool": pool,
        "broker": broker_info(worker.app.broker_url),
        "prefetch_count": worker.prefetch,
        "rusage": _rusage(),
        "active": state.active,
        "revoked": state.revoked,
    }


@command
async def _active_queues(worker: Worker, arguments: dict[str, Any]) -> Any:
    return [queue_info(name) for name in worker.queues]


@command
async def _conf(worker: Worker, arguments: dict[str, Any]) -> Any:
    conf, with_defaults = worker.app.conf, bool(arguments.get("with_defaults"))
    table = {}
    for name, info in type(conf).model_fields.items():
        value = getattr(conf, name)
        if with_defaults or value != info.default:
            table[name] = _shown(name, value)
    return table


@command
async def _clock(worker: Worker, arguments: dict[str, Any]) -> Any:
    return {"clock": CLOCK.value}


@command
async def _hello(worker: Worker, arguments: dict[str, Any]) -> Any:
    """A starting Celery worker asks its peers for their revoked ids (Celery's "mingle")."""
    if arguments.get("from_node") == worker.hostname:
        return None
    worker.state.revoke([str(i) for i in arguments.get("revoked") or []])
    return {"revoked": sorted(worker.state.revoked), "clock": CLOCK.forward()}


# Control --------------------------------------------------------------------------------------------


@command
async def _rate_limit(worker: Worker, arguments: dict[str, Any]) -> Any:
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
async def _time_limit(worker: Worker, arguments: dict[str, Any]) -> Any:
    name, hard = arguments.get("task_name"), arguments.get("hard")
    runtime = worker.runtimes.get(str(name))
    if runtime is None:
        return {"error": f"unknown task {name!r}"}
    runtime.time_limit = float(hard) if hard is not None else None
    logger.info("New time limit for tasks of type %s: %s", name, hard)
    return {"ok": "time limits set successfully"}


@command
async def _revoke(worker: Worker, arguments: dict[str, Any]) -> Any:
    ids = arguments.get("task_id") or []
    ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
    worker.state.revoke(ids)
    return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}


@command
async def _enable_events(worker: Worker, arguments: dict[str, Any]) -> Any:
    if worker.monitoring.enable_task_events():
        logger.info("Events of group {task} enabled by remote.")
        return {"ok": "task events enabled"}
    return {"ok": "task events already enabled"}


@command
async def _disable_events(worker: Worker, arguments: dict[str, Any]) -> Any:
    if worker.monitoring.disable_task_events():
        logger.info("Events of group {task} disabled by remote.")
        return {"ok": "task events disabled"}
    return {"ok": "task events already disabled"}


@command
async def _heartbeat(worker: Worker, arguments: dict[str, Any]) -> Any:
    worker.monitoring.send_heartbeat()
    return None


@command
async def _shutdown(worker: Worker, arguments: dict[str, Any]) -> Any:
    logger.warning("Got shutdown from remote")
    worker.request_stop()
    return {"ok": "shutting down"}


# Replies in Celery's shapes -------------------------------------------------------------------------


def request_info(
    worker: Worker, message: Message, delivery: Delivery, started: float | None = None, safe: bool = False
) -> dict[str, Any]:
    """A task the worker holds, as Celery's ``Request.info()``."""
    return {
        "id": message.id,
        "name": message.task,
        "args": safe_repr(list(message.args)) if safe else message.args,
        "kwargs": safe_repr(message.kwargs) if safe else message.kwargs,
        "type": message.task,
        "hostname": worker.hostname,
        "time_start": started,
        "acknowledged": delivery.settled,
        "delivery_info": {
            "exchange": "",
            "routing_key": delivery.queue,
            "priority": message.priority,
            "redelivered": delivery.redelivered,
        },
        "worker_pid": os.getpid() if started is not None else None,
    }


def _reordered(entry: tuple[Message, float, Delivery]) -> tuple[Message, Delivery, float]:
    message, started, delivery = entry
    return message, delivery, started


def queue_info(name: str) -> dict[str, Any]:
    """A queue the worker consumes, as kombu's ``Queue.as_dict()`` (a direct exchange of the same name)."""
    exchange = {"name": name, "type": "direct", "arguments": None, "durable": True, "passive": False}
    exchange |= {"auto_delete": False, "delivery_mode": None, "no_declare": False}
    info: dict[str, Any] = {"name": name, "exchange": exchange, "routing_key": name}
    info |= dict.fromkeys(("queue_arguments", "binding_arguments", "consumer_arguments", "alias"))
    info |= {"durable": True, "exclusive": False, "auto_delete": False, "no_ack": False, "bindings": []}
    info |= dict.fromkeys(("no_declare", "expires", "message_ttl", "max_length", "max_length_bytes"))
    info["max_priority"] = None
    return info


def broker_info(url: str) -> dict[str, Any]:
    """The broker connection as Celery's ``stats`` shows it, without the password."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.replace("pyamqp", "amqp")
    try:
        port = parts.port
    except ValueError:
        port = None
    return {
        "hostname": parts.hostname,
        "userid": unquote(parts.username) if parts.username else None,
        "virtual_host": unquote(parts.path[1:]) if parts.path[1:] else "/",
        "port": port,
        "insist": False,
        "ssl": scheme in ("amqps", "rediss"),
        "transport": scheme.rstrip("s") if scheme in ("amqps", "rediss") else scheme,
        "connect_timeout": 4,
        "transport_options": {},
        "login_method": None,
        "uri_prefix": None,
        "heartbeat": None,
        "failover_strategy": "round-robin",
        "alternates": [],
        "credential_provider": None,
    }


def _rusage() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {name.removeprefix("ru_"): getattr(usage, name) for name in dir(usage) if name.startswith("ru_")}


def _shown(name: str, value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return mask_password(value)
    if _HIDDEN.search(name) and value:
        return "********"
    if isinstance(value, dict):
        return {str(k): _shown(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown(name, v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return safe_repr(value)


# The server -----------------------------------------------------------------------------------------


class ControlServer:
    """Answers the pidbox requests addressed to this worker (by name, by pattern, or to all)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def serve(self, inbox: AsyncIterator[ExchangeMessage]) -> None:
        async for message in inbox:
            try:
                request = pydantic_core.from_json(message.body)
                if not isinstance(request, dict):
                    raise ValueError(f"expected a JSON object, got {type(request).__name__}")
                clock = message.headers.get("clock")
                CLOCK.adjust(clock) if isinstance(clock, int) else CLOCK.forward()
                await self._answer(request)
            except Exception as exc:
                logger.warning("Ignoring a bad control message: %s", exc)

    def _addressed(self, request: dict[str, Any]) -> bool:
        destination, pattern = request.get("destination"), request.get("pattern")
        hostname = self.worker.hostname
        if destination:  # a supervised process also answers to its parent's name
            return not {hostname, *self.worker.aliases}.isdisjoint(destination)
        if pattern and request.get("matcher") == "pcre":
            return re.match(pattern, hostname) is not None
        return fnmatch.fnmatch(hostname, pattern) if pattern else True

    async def _answer(self, request: dict[str, Any]) -> None:
        if not self._addressed(request):
            return
        method = request.get("method")
        handler = COMMANDS.get(method) if isinstance(method, str) else None
        arguments = request.get("arguments") or {}
        if handler is None:
            reply: Any = {"error": f"unknown command {method!r}"}
        else:
            try:
                reply = await handler(self.worker, arguments if isinstance(arguments, dict) else {})
            except Exception as exc:
                logger.exception("Remote control command %s failed", method)
                reply = {"error": safe_repr(exc)}
        reply_to = request.get("reply_to")
        if isinstance(reply_to, dict) and request.get("ticket"):
            await self._reply(reply_to, request["ticket"], reply)

    async def _reply(self, reply_to: dict[str, Any], ticket: str, reply: Any) -> None:
        exchange = Exchange(str(reply_to.get("exchange")), "direct")
        headers = {"ticket": ticket, "clock": CLOCK.forward()}
        body = pydantic_core.to_json({self.worker.hostname: reply}, fallback=safe_repr)
        message = ExchangeMessage(body, headers, str(reply_to.get("routing_key") or ""))
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):  # the asker has long given up by then
                await self.worker.app.broker.send_to_exchange(exchange, message)
        except TimeoutError:
            logger.warning(
                "Dropped a remote control reply to %s: the broker took over %.0fs.",
                exchange.name,
                REPLY_TIMEOUT,
            )
