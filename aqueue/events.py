"""Celery's monitoring events: built with Celery's field names, sent in batches, received and printed.

An event is a flat JSON object: ``type`` (``task-succeeded``, ``worker-heartbeat``, ...), the common
fields ``hostname``, ``utcoffset``, ``pid``, ``clock`` (a Lamport clock), ``timestamp``, and the fields of
its type, as Celery's worker and client send them (``uuid``, ``name``, ``args``/``kwargs`` as repr
strings, ``result``, ``runtime``, ``exception``, ``traceback``, ``freq``, ``active``, ``processed``,
``loadavg``, ``sw_ident``, ...). They go to the topic exchange ``event_exchange`` (``celeryev``).

:class:`EventDispatcher` sends what one loop turn produced together: per group (``task``, ``worker``),
one event alone goes as one message with its type as routing key (``task.succeeded``), several as one
JSON list with routing key ``<group>.multi``, as Celery's worker batches its task events.
:class:`EventReceiver` reads both forms, from aqueue and Celery processes alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener
from aqueue.message import Message

if TYPE_CHECKING:
    from aqueue.app import App
    from aqueue.broker.base import Broker

__all__ = [
    "LamportClock",
    "EventDispatcher",
    "EventReceiver",
    "dump_line",
    "event_exchange",
    "safe_repr",
    "task_received_fields",
    "task_sent_fields",
    "worker_fields",
]

logger = logging.getLogger("aqueue.events")

Send = Callable[[Exchange, ExchangeMessage], Awaitable[None]]
Event = dict[str, Any]

BATCH_LIMIT = 1000
"""Most events in one message."""
BROADCAST_PAUSE = 0.1
"""Seconds between batches on brokers that carry events over broadcast (their readers poll about as often)."""
REPR_LIMIT = 1024
"""Longest repr of arguments or a result in an event, as Celery's ``resultrepr_maxsize``."""


class LamportClock:
    """Celery's logical clock: forward before sending, adjust on receiving."""

    def __init__(self) -> None:
        self.value = 0

    def forward(self) -> int:
        self.value += 1
        return self.value

    def adjust(self, other: int) -> int:
        self.value = max(self.value, other) + 1
        return self.value


CLOCK = LamportClock()
"""This process's clock, shared by its events and remote-control messages."""


def event_exchange(name: str = "celeryev") -> Exchange:
    """The exchange events go to, declared as Celery declares it (topic, durable)."""
    return Exchange(name, "topic", durable=True)


def utcoffset() -> float:
    """Hours *west* of UTC, as Celery's ``utcoffset()`` (receivers use it to read ``timestamp``)."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


def safe_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, never raising."""
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _iso(when: float | None) -> str | None:
    return datetime.fromtimestamp(when, UTC).isoformat() if when is not None else None


def task_received_fields(message: Message) -> Event:
    """The fields of ``task-received`` (``task-sent`` adds where it went)."""
    return {
        "uuid": message.id,
        "name": message.task,
        "args": safe_repr(list(message.args)),
        "kwargs": safe_repr(message.kwargs),
        "root_id": message.root_id or message.id,
        "parent_id": message.parent_id,
        "retries": message.retries,
        "eta": _iso(message.eta),
        "expires": _iso(message.expires),
    }


def task_sent_fields(message: Message, queue: str) -> Event:
    """The fields of ``task-sent``: those of ``task-received`` and the queue (Celery's exchange is ``''``)."""
    return {**task_received_fields(message), "queue": queue, "exchange": "", "routing_key": queue}


def worker_fields(freq: float, active: int, processed: int) -> Event:
    """The fields of ``worker-online``, ``worker-heartbeat`` and ``worker-offline``."""
    from aqueue import __version__

    return {
        "freq": freq,
        "active": active,
        "processed": processed,
        "loadavg": [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else [0, 0, 0],
        "sw_ident": "py-aqueue",
        "sw_ver": __version__,
        "sw_sys": platform.system(),
    }


class EventDispatcher:
    """Sends events of the enabled ``groups``, each loop turn's worth together, through ``send``.

    Sending never raises and never waits: events that cannot be sent (the broker is down) are dropped,
    with one warning per outage. With ``pause``, a batch goes at most every ``pause`` seconds (for brokers
    whose readers poll).
    """

    def __init__(
        self,
        send: Send,
        hostname: str,
        *,
        exchange: str = "celeryev",
        groups: Iterable[str] = ("task", "worker"),
        pause: float = 0.0,
    ) -> None:
        self.hostname, self.exchange = hostname, event_exchange(exchange)
        self.groups, self.pause = set(groups), pause
        self._send, self._pid, self._clock = send, os.getpid(), CLOCK
        self._utcoffset = utcoffset()
        self._pending: dict[str, list[Event]] = {}
        """Events not sent yet, by group, the groups in the order of their first event."""
        self._tasks: list[Event] = []
        """``_pending['task']`` once a task event is pending (the most frequent group: no lookup per event)."""
        self._flusher: asyncio.Task[None] | None = None
        self._failing = False

    @classmethod
    def for_worker(cls, app: App, hostname: str) -> EventDispatcher:
        """The dispatcher of a worker: worker events, and task events once enabled."""
        send, exchange = app.broker.send_to_exchange, app.conf.event_exchange
        return cls(send, hostname, exchange=exchange, groups=("worker",), pause=_pause(app))

    @classmethod
    def for_client(cls, app: App) -> EventDispatcher:
        """The dispatcher of a process that sends tasks: named ``gen<pid>@<host>`` as Celery's clients are."""

        async def send(exchange: Exchange, message: ExchangeMessage) -> None:
            await app.connect()
            await app.broker.send_to_exchange(exchange, message)

        name = f"gen{os.getpid()}@{socket.gethostname()}"
        return cls(send, name, exchange=app.conf.event_exchange, groups=("task",), pause=_pause(app))

    def send(self, type: str, **fields: Any) -> None:
        """Queue an event of ``type`` (``task-succeeded``) for this loop turn's batch."""
        self.emit(type, fields)

    def emit(self, type: str, fields: Event) -> None:
        """:meth:`send` with the fields in a dict (which becomes the event: the caller gives it away)."""
        group = type.partition("-")[0]
        if group == "task":
            if "task" in self.groups:
                self.emit_task(type, fields)
        elif group in self.groups:
            self._pending.setdefault(group, []).append(self._stamped(type, fields))
            self._start()

    def emit_task(self, type: str, fields: Event) -> None:
        """:meth:`emit` of a task event, for a caller that knows task events are on."""
        tasks = self._tasks
        if not tasks:  # the group's place in the batch: where its first event came
            self._pending["task"] = tasks
            self._start()
        tasks.append(self._stamped(type, fields))

    def _stamped(self, type: str, fields: Event) -> Event:
        fields["hostname"], fields["utcoffset"], fields["pid"] = self.hostname, self._utcoffset, self._pid
        fields["clock"], fields["timestamp"], fields["type"] = self._clock.forward(), time.time(), type
        return fields

    def _start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def aclose(self) -> None:
        """Send what is queued."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        self._utcoffset = utcoffset()  # read once per batch: it changes twice a year
        try:
            if self.pause:
                await asyncio.sleep(self.pause)
            while self._pending:
                groups, self._pending, self._tasks = self._pending, {}, []
                for message in self._messages(groups):
                    await self._deliver(message)
        finally:
            self._flusher = None

    def _messages(self, groups: dict[str, list[Event]]) -> Iterable[ExchangeMessage]:
        headers = {"hostname": self.hostname}
        for group, events in groups.items():
            if len(events) == 1:
                key = events[0]["type"].replace("-", ".")
                yield ExchangeMessage(pydantic_core.to_json(events[0]), headers, key)
                continue
            for i in range(0, len(events), BATCH_LIMIT):
                body = pydantic_core.to_json(events[i : i + BATCH_LIMIT])
                yield ExchangeMessage(body, headers, f"{group}.multi")

    async def _deliver(self, message: ExchangeMessage) -> None:
        try:
            await self._send(self.exchange, message)
        except Exception as exc:
            if not self._failing:
                logger.warning(
                    "Cannot send events to exchange %r, dropping them: %s", self.exchange.name, exc
                )
            self._failing = True
        else:
            if self._failing:
                logger.info("Sending events to exchange %r again", self.exchange.name)
            self._failing = False


def _pause(app: App) -> float:
    """Brokers that carry events over polled broadcasts (SQLite) get them in fewer, larger batches."""
    from aqueue.broker.base import Broker

    return BROADCAST_PAUSE if type(app.broker).send_to_exchange is Broker.send_to_exchange else 0.0


class EventReceiver:
    """Reads events from an exchange, as Celery's ``EventReceiver`` does (lists and single events).

    Parameters:
        broker: where to read.
        exchange: the event exchange (``event_exchange``).
        routing_key: which events (``#``: all; ``task.#``, ``worker.heartbeat``, ...).
        queue_prefix, queue_ttl, queue_expires: the reader's queue, as Celery's ``event_queue_*``.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        exchange: str = "celeryev",
        routing_key: str = "#",
        queue_prefix: str = "celeryev",
        queue_ttl: float | None = 5.0,
        queue_expires: float | None = 60.0,
    ) -> None:
        self.broker, self.exchange = broker, event_exchange(exchange)
        self.listener = Listener(f"{queue_prefix}.{uuid.uuid4()}", routing_key, queue_ttl, queue_expires)

    @asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Event]]:
        """Events sent from the moment the context is entered, one dict each."""
        async with self.batches() as batches:
            yield (event async for batch in batches for event in batch)

    @asynccontextmanager
    async def batches(self) -> AsyncIterator[AsyncIterator[list[Event]]]:
        """:meth:`events` as sent: one list per message (a reader of thousands a second pays less per event)."""
        async with self.broker.bind_exchange(self.exchange, self.listener) as inbox:
            yield self._decoded(inbox)

    async def _decoded(self, inbox: AsyncIterator[ExchangeMessage]) -> AsyncIterator[list[Event]]:
        async for message in inbox:
            try:
                body = pydantic_core.from_json(message.body)
            except ValueError as exc:
                logger.warning("Ignoring an event message that is not JSON: %s", exc)
                continue
            batch = []
            for event in body if isinstance(body, list) else [body]:
                if isinstance(event, dict) and isinstance(event.get("type"), str):
                    clock = event.get("clock")
                    event["clock"] = CLOCK.adjust(clock) if isinstance(clock, int) else CLOCK.forward()
                    batch.append(event)
            if batch:
                yield batch


_HUMAN_TYPES = {"worker-offline": "shutdown", "worker-online": "started", "worker-heartbeat": "heartbeat"}


def dump_line(event: Event, names: dict[str, str] | None = None) -> str:
    """One line for ``event``, as ``celery events --dump`` prints it.

    ``names`` remembers the task description of ``task-received``/``task-sent`` for the later events of
    the same task.
    """
    event = dict(event)
    when = datetime.fromtimestamp(float(event.pop("timestamp", 0) or 0), UTC)
    kind, hostname = str(event.pop("type", "")).lower(), event.pop("hostname", "?")
    human = _HUMAN_TYPES.get(kind, kind.replace("-", " "))
    task = ""
    if kind.startswith("task-"):
        task_id, known = event.pop("uuid", ""), names if names is not None else {}
        if kind in ("task-received", "task-sent"):
            name, args, kwargs = event.pop("name", ""), event.pop("args", ""), event.pop("kwargs", "")
            known[task_id] = f"{name}({task_id}) args={args} kwargs={kwargs}"
        task = f" {known.get(task_id, '')}"
    fields = ", ".join(f"{key}={event[key]}" for key in sorted(event))
    return f"{hostname} [{when}] {human}{':' if fields else ''}{task} {fields}".rstrip()
