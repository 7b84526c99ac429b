"""What the worker tells observers at each change of a task's state: Celery's events, Prometheus metrics.

:class:`Observer` has one no-op method per change; the executor calls them on ``executor.observer``,
which is :data:`NOTHING` while nothing observes (so monitoring that is off costs a no-op call), one
observer, or :class:`Observers` (several, in order; one that fails is logged and the others still run).
A hook must not block: it records, and anything slow happens later (events go out once per loop turn).

In the life of one delivery: ``after_receive``; then ``after_rate_limit`` if it waited for a token;
then either ``after_skip`` (revoked, expired, already finished) or ``before_start`` followed by one of
``after_success``, ``after_failure``, ``after_retry`` and ``after_reject``. ``after_unknown`` is for a
message naming a task the worker does not have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aqueue.events import EventDispatcher, safe_repr, task_received_fields, worker_fields
from aqueue.message import Message

if TYPE_CHECKING:
    from aqueue.worker.execution import Executor
    from aqueue.worker.metrics import Metrics, MetricsServer
    from aqueue.worker.worker import Worker

__all__ = ["NOTHING", "Monitoring", "Observer", "Observers", "TaskEvents", "heartbeats"]

logger = logging.getLogger("aqueue.worker")

HEARTBEAT_INTERVAL = 2.0
"""Seconds between worker-heartbeat events, as Celery's."""


class Observer:
    """Hooks on a task's states; each does nothing here."""

    def after_receive(self, message: Message) -> None:
        """A message of a known task arrived, before it waits for a token or a slot."""

    def after_rate_limit(self, message: Message, waited: float) -> None:
        """The task waited ``waited`` seconds for its rate limit's token(s)."""

    def after_skip(self, message: Message, why: str) -> None:
        """Acknowledged without running: ``why`` is ``revoked``, ``expired`` or ``finished``."""

    def before_start(self, message: Message) -> None:
        """The task is about to run (acknowledged first, unless it acks late)."""

    def after_success(self, message: Message, result: Any, runtime: float) -> None:
        """The task returned ``result`` after ``runtime`` seconds."""

    def after_failure(self, message: Message, exc: BaseException, traceback: str, runtime: float) -> None:
        """The task raised ``exc``; it is not retried."""

    def after_retry(self, message: Message, exc: BaseException, traceback: str | None) -> None:
        """The task asked to be retried; its new message has been sent."""

    def after_reject(self, message: Message, requeue: bool) -> None:
        """The task raised ``Reject``: its message was given back (``requeue``) or dead-lettered."""

    def after_unknown(self, message: Message) -> None:
        """The message names a task this worker does not have; it was dead-lettered."""


NOTHING = Observer()
"""The observer of a worker nobody observes."""


class Observers(Observer):
    """Several observers: ``before_`` hooks in order, ``after_`` hooks in reverse; one that raises is logged
    and does not stop the others."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)

    def _each(self, hook: str, *args: Any) -> None:
        for observer in reversed(self.observers) if hook.startswith("after_") else self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                logger.exception("Observer %r failed in %s", observer, hook)

    def after_receive(self, message: Message) -> None:
        self._each("after_receive", message)

    def after_rate_limit(self, message: Message, waited: float) -> None:
        self._each("after_rate_limit", message, waited)

    def after_skip(self, message: Message, why: str) -> None:
        self._each("after_skip", message, why)

    def before_start(self, message: Message) -> None:
        self._each("before_start", message)

    def after_success(self, message: Message, result: Any, runtime: float) -> None:
        self._each("after_success", message, result, runtime)

    def after_failure(self, message: Message, exc: BaseException, traceback: str, runtime: float) -> None:
        self._each("after_failure", message, exc, traceback, runtime)

    def after_retry(self, message: Message, exc: BaseException, traceback: str | None) -> None:
        self._each("after_retry", message, exc, traceback)

    def after_reject(self, message: Message, requeue: bool) -> None:
        self._each("after_reject", message, requeue)

    def after_unknown(self, message: Message) -> None:
        self._each("after_unknown", message)


def combine(observers: Sequence[Observer]) -> Observer:
    """What the executor calls: :data:`NOTHING`, the one observer, or :class:`Observers`."""
    if not observers:
        return NOTHING
    return observers[0] if len(observers) == 1 else Observers(observers)


class TaskEvents(Observer):
    """Sends Celery's task events (``task-received`` ... ``task-rejected``) through a dispatcher."""

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.emit = dispatcher.emit_task  # observed only while task events are on

    def after_receive(self, message: Message) -> None:
        self.emit("task-received", task_received_fields(message))

    def after_skip(self, message: Message, why: str) -> None:
        if why in ("revoked", "expired"):
            fields = {"uuid": message.id, "terminated": False, "signum": None, "expired": why == "expired"}
            self.emit("task-revoked", fields)

    def before_start(self, message: Message) -> None:
        self.emit("task-started", {"uuid": message.id})

    def after_success(self, message: Message, result: Any, runtime: float) -> None:
        self.emit("task-succeeded", {"uuid": message.id, "result": safe_repr(result), "runtime": runtime})

    def after_failure(self, message: Message, exc: BaseException, traceback: str, runtime: float) -> None:
        fields = {"uuid": message.id, "exception": safe_repr(exc), "traceback": traceback}
        self.emit("task-failed", fields)

    def after_retry(self, message: Message, exc: BaseException, traceback: str | None) -> None:
        fields = {"uuid": message.id, "exception": safe_repr(exc), "traceback": traceback or ""}
        self.emit("task-retried", fields)

    def after_reject(self, message: Message, requeue: bool) -> None:
        self.emit("task-rejected", {"uuid": message.id, "requeue": requeue})

    def after_unknown(self, message: Message) -> None:
        self.emit("task-failed", {"uuid": message.id, "exception": f"NotRegistered({message.task!r})"})


def heartbeat(dispatcher: EventDispatcher, worker: Worker, type: str = "worker-heartbeat") -> None:
    """Send one worker event of ``type`` now."""
    stats = worker.state
    fields = worker_fields(HEARTBEAT_INTERVAL, len(stats.active), sum(stats.total.values()))
    dispatcher.send(type, **fields)


async def heartbeats(dispatcher: EventDispatcher, worker: Worker) -> None:
    """``worker-online``, then a ``worker-heartbeat`` every 2 s until cancelled."""
    heartbeat(dispatcher, worker, "worker-online")
    next_beat = time.monotonic()
    while True:
        next_beat += HEARTBEAT_INTERVAL
        await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
        heartbeat(dispatcher, worker)


class Monitoring:
    """A worker's events and metrics: who observes its executor, and the parts that go with them.

    Task events are on from the start with ``-E``, or once ``enable_events`` comes by remote control
    (Flower sends it); either way the worker then also sends its online, heartbeat and offline events.
    Metrics are served when ``metrics_port`` is given.
    """

    def __init__(self, worker: Worker, metrics_port: int | None) -> None:
        self.worker, self.metrics_port = worker, metrics_port
        self.events: EventDispatcher | None = None
        """Sends the worker's events, once they are on."""
        self.metrics: Metrics | None = None
        self._server: MetricsServer | None = None
        self._executor: Executor | None = None

    def serve_metrics(self) -> None:
        """Start serving ``/metrics`` (before anything else starts, so a port in use fails at once).

        Raises:
            ImproperlyConfigured: the port cannot be used.
        """
        if self.metrics_port is None:
            return
        from aqueue.worker.metrics import MetricsServer, in_multiprocess_mode, multiprocess_registry

        address = self.worker.app.conf.worker_metrics_address
        registry = self.count_metrics().registry
        server = MetricsServer(
            multiprocess_registry() if in_multiprocess_mode() else registry, self.metrics_port, address
        )
        server.start()
        self._server = server

    def count_metrics(self) -> Metrics:
        """Count into Prometheus metrics, served or not (a child of ``--processes`` counts, its parent serves)."""
        if self.metrics is None:
            from aqueue.worker.metrics import Metrics

            self.metrics = Metrics()
        return self.metrics

    @property
    def metrics_url(self) -> str | None:
        """Where the Prometheus metrics are served, when they are."""
        server = self._server
        return f"http://{server.address}:{server.port}/metrics" if server is not None else None

    def start(self, executor: Executor) -> None:
        """Observe ``executor``."""
        self._executor = executor
        if self.metrics is not None:
            self.worker.spawn(self.metrics.track(self.worker))
            self._observe()

    def enable_task_events(self) -> bool:
        """Send task events from now on (and worker events); False when they were on already."""
        if self.events is None:
            self.events = EventDispatcher.for_worker(self.worker.app, self.worker.hostname)
            self.worker.spawn(heartbeats(self.events, self.worker))
        if "task" in self.events.groups:
            return False
        self.events.groups.add("task")
        self._observe()
        return True

    def disable_task_events(self) -> bool:
        """Stop sending task events (worker events go on); False when they were off already."""
        if self.events is None or "task" not in self.events.groups:
            return False
        self.events.groups.discard("task")
        self._observe()
        return True

    def send_heartbeat(self) -> None:
        """Send a worker-heartbeat event now, when events are on."""
        if self.events is not None:
            heartbeat(self.events, self.worker)

    async def aclose(self) -> None:
        """Say the worker is offline, send what is queued, stop serving metrics."""
        if self.events is not None:
            heartbeat(self.events, self.worker, "worker-offline")
            await self.events.aclose()
            self.events = None
        server, self._server = self._server, None
        if server is not None:
            await server.aclose()

    def _observe(self) -> None:
        observers: list[Observer] = [self.metrics] if self.metrics is not None else []
        if self.events is not None and "task" in self.events.groups:
            observers.append(TaskEvents(self.events))
        if self._executor is not None:
            self._executor.observer = combine(observers)
