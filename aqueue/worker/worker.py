"""Worker lifecycle: ``async with Worker(app):`` or ``await worker.run()``; parts run as tasks."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from aqueue._tasks import cancel_until_done
from aqueue.broker.base import Consumer, Delivery
from aqueue.control import Mailbox
from aqueue.exceptions import OperationalError
from aqueue.serialization import accepted_content_types
from aqueue.worker.consumer import ConsumerLoop
from aqueue.worker.control import ControlServer
from aqueue.worker.execution import Executor, TaskRuntime
from aqueue.worker.limits import ConcurrencyLimit
from aqueue.worker.observer import Monitoring
from aqueue.worker.state import WorkerState

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["Worker", "default_hostname"]

logger = logging.getLogger("aqueue.worker")

PART_STOP_TIMEOUT = 5.0
"""Seconds the consumer, remote control and monitoring loops get to end once cancelled."""


def default_hostname() -> str:
    return f"aqueue@{socket.gethostname()}"


class Worker:
    """Consumes ``queues`` and runs up to ``concurrency`` tasks at once, inside the current event loop.

    Parameters:
        app: the app whose tasks this worker runs.
        concurrency: tasks at once (default: ``worker_concurrency``).
        queues: queues to consume (default: ``[task_default_queue]``).
        hostname: the worker's name in remote control (default ``aqueue@<hostname>``).
        prefetch_multiplier: unacknowledged messages held = concurrency x this.
        shutdown_timeout: seconds running tasks get to finish on shutdown before they are requeued.
        statedb: a file keeping revoked task ids across restarts.
        max_tasks: take at most this many messages, then :meth:`retire` (``--max-tasks-per-child``).
        send_events: send Celery's task and worker events (``-E``; default: ``worker_send_task_events``).
        metrics_port: serve Prometheus metrics on this port (default: ``worker_metrics_port``, none).
    """

    aliases: frozenset[str] = frozenset()
    """Other names this worker answers remote control to (a child process answers to its parent's)."""

    def __init__(
        self,
        app: App,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        hostname: str | None = None,
        prefetch_multiplier: int | None = None,
        shutdown_timeout: float | None = None,
        statedb: str | None = None,
        max_tasks: int | None = None,
        send_events: bool | None = None,
        metrics_port: int | None = None,
    ) -> None:
        conf = app.conf
        self.app = app
        self.concurrency = concurrency or conf.worker_concurrency
        self.queues = list(queues or [conf.task_default_queue])
        self.hostname = hostname or default_hostname()
        self.prefetch = self.concurrency * (prefetch_multiplier or conf.worker_prefetch_multiplier)
        self.shutdown_timeout = conf.worker_shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        self.state = WorkerState(statedb or conf.worker_state_db)
        self.slots = ConcurrencyLimit(self.concurrency)
        self.max_tasks = max_tasks
        self.runtimes: dict[str, TaskRuntime] = {}
        self.send_events = conf.worker_send_task_events if send_events is None else send_events
        metrics_port = conf.worker_metrics_port if metrics_port is None else metrics_port
        self.monitoring = Monitoring(self, metrics_port)
        """Events and metrics: what observes the executor, and the parts that go with them."""
        self._stack: AsyncExitStack | None = None
        self._loop: ConsumerLoop | None = None
        self._parts: list[asyncio.Task[None]] = []
        self._retiring = False
        self._stop_requested = asyncio.Event()
        self.failure: BaseException | None = None
        """What made a part of the worker fail; :meth:`run` and ``async with`` raise it after stopping."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        if self.failure is not None and exc is None:
            raise self.failure

    async def run(self) -> None:
        """Start, consume until :meth:`request_stop` is called (e.g. by a signal), then stop gracefully.

        Raises:
            Exception: what made the consumer or the control loop fail, after the worker stopped.
        """
        await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await asyncio.shield(self.stop())
        if self.failure is not None:
            raise self.failure

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully (safe to call from a signal handler)."""
        self._stop_requested.set()

    async def start(self) -> None:
        """Connect, then start consuming and answering remote control."""
        app = self.app
        app.import_modules()
        app.finalize()
        await self._connect()
        tasks = {**app.builtins, **app.tasks}
        self.runtimes = {name: TaskRuntime.build(app, task) for name, task in tasks.items()}
        self.monitoring.serve_metrics()
        accepted = accepted_content_types(app.conf.accept_content)
        stack = self._stack = AsyncExitStack()
        consumer = await stack.enter_async_context(app.broker.consume(self.queues, self.prefetch))
        executor = Executor(app, self.state, self.slots, self.hostname)
        intake = None if self.max_tasks is None else _quota(consumer, self.max_tasks, self._quota_met)
        self._loop = ConsumerLoop(
            consumer, self.runtimes, executor, app.backend, accepted, app.broker.codec, intake
        )
        self._parts = []
        self.spawn(self._loop.run())
        await self._start_control(stack)
        self.state.load()  # again: revocations saved by others since __init__, before we subscribed
        self.monitoring.start(executor)
        if self.send_events:
            self.monitoring.enable_task_events()
        logger.info("%s ready.", self.hostname)

    def spawn(self, part: Coroutine[Any, Any, None]) -> None:
        """Run ``part`` until the worker stops; its failure stops the worker."""
        task = asyncio.create_task(part)
        task.add_done_callback(self._part_done)
        self._parts.append(task)

    async def _start_control(self, stack: AsyncExitStack) -> None:
        mailbox = Mailbox.of(self.app.conf)
        try:
            inbox = await stack.enter_async_context(
                self.app.broker.bind_exchange(mailbox.exchange, mailbox.node(self.hostname))
            )
        except OperationalError as exc:
            logger.warning(
                "Remote control is off for %s: %s. Is another worker running with the same name? "
                "Give each worker its own with -n NAME.",
                self.hostname,
                exc,
            )
            return
        self.spawn(ControlServer(self).serve(inbox))

    def retire(self, reason: str) -> None:
        """Take no more work and stop answering remote control; stop once the tasks taken have finished.

        Unlike :meth:`request_stop`, the tasks this worker holds all run to the end, with no grace period:
        this is how a child process is recycled. A signal meanwhile shuts down as usual.
        """
        if self._retiring or self._loop is None:
            return
        self._retiring = True
        logger.info("%s: %s; taking no more work, finishing the tasks it holds.", self.hostname, reason)
        for part in self._parts:
            part.cancel()
        self._parts.append(asyncio.create_task(self._drain()))

    def _quota_met(self) -> None:
        self.retire(f"took its {self.max_tasks} tasks (max tasks per child)")

    async def _drain(self) -> None:
        assert self._loop is not None
        while self._loop.running:
            await asyncio.wait(set(self._loop.running))
        self.request_stop()

    def _part_done(self, part: asyncio.Task[None]) -> None:
        if not part.cancelled() and part.exception() is not None:
            logger.critical("Worker part failed: %r; shutting down.", part.exception())
            self.failure = self.failure or part.exception()
            self.request_stop()

    async def _connect(self) -> None:
        conf, delay = self.app.conf, 0.5
        attempts = (conf.broker_connection_max_retries or 0) if conf.broker_connection_retry_on_startup else 0
        for attempt in range(attempts + 1):
            try:
                await self.app.connect()
                return
            except OperationalError as exc:
                if attempt == attempts:
                    raise
                logger.error(
                    "Cannot connect to %s: %s. Trying again in %.1fs...", self.app.broker, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def stop(self) -> None:
        """Stop taking work, let running tasks finish within the grace period, requeue the rest."""
        if self._stack is None:
            return
        stuck = await cancel_until_done(self._parts, PART_STOP_TIMEOUT)
        if stuck:
            logger.warning(
                "%s: %d worker part(s) did not stop within %.0fs; going on with the shutdown.",
                self.hostname,
                len(stuck),
                PART_STOP_TIMEOUT,
            )
        if self._loop is not None:
            self._loop.executor.close()
        running = self._loop.running if self._loop else set()
        if running:
            logger.info("Waiting up to %.1fs for %d running task(s)...", self.shutdown_timeout, len(running))
            _, pending = await asyncio.wait(running, timeout=self.shutdown_timeout)
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.app.publisher.drain()
        await self.monitoring.aclose()
        stack, self._stack = self._stack, None
        await stack.aclose()
        self.state.save()
        logger.info("%s stopped.", self.hostname)

    def statistics(self) -> dict[str, Any]:
        return {"state": self.state.statistics(), "pool": self.slots.statistics()}


async def _quota(consumer: Consumer, tasks: int, met: Callable[[], None]) -> AsyncIterator[Delivery]:
    """The first ``tasks`` deliveries of ``consumer``; ``met()`` is called as the last one is handed out."""
    for taken in range(1, tasks + 1):
        delivery = await consumer.receive()
        if taken == tasks:
            met()
        yield delivery
