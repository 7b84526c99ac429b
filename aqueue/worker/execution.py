"""One task run: early or late ack, STARTED, await or thread, time limit, retry, store, log.

Admission: a delivery gets its asyncio task only when it can start. Slots go first come, first served, in
one line (:class:`~aqueue.worker.limits.ConcurrencyLimit`), to deliveries that hold their rate limit's token.
On arrival a delivery takes its token if it can (a task without a rate limit always can); then it starts at
once when a slot is free and nobody is in line, else it joins the line as a plain (delivery, message,
runtime) entry, with no task. A finished run hands its slot straight to the first in line and starts it.
A delivery that cannot take its token at once (an empty bucket, or a ``global_rate_limit``, whose tokens
take a round trip) gets a task that waits for its token(s), then takes a free slot or joins the same line.
Neither kind starves the other: the line is strictly FIFO, and a token wait holds no slot and no place.
:meth:`Executor.close` cancels the token waits and empties the line; both give their messages back to the
broker, and nothing that waited starts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from aqueue import states
from aqueue.broker.base import Broker, Delivery
from aqueue.exceptions import (
    DeliveryLost,
    EncodeError,
    Ignore,
    ImproperlyConfigured,
    OperationalError,
    Reject,
    Retry,
    TimeLimitExceeded,
)
from aqueue.message import Message
from aqueue.options import ResolvedOptions
from aqueue.rates import parse_rate
from aqueue.result.base import TaskMeta
from aqueue.result.failure import exception_to_result, format_traceback
from aqueue.serialization import get_serializer
from aqueue.task import Context, Task, _request
from aqueue.worker.limits import ConcurrencyLimit, SharedBucket, TokenBucket
from aqueue.worker.observer import NOTHING, Observer
from aqueue.worker.state import WorkerState

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["Executor", "TaskRuntime"]

logger = logging.getLogger("aqueue.worker")


@dataclass(slots=True, kw_only=True)
class TaskRuntime:
    """A task's options as the worker applies them, worked out once at start-up."""

    task: Task[Any, Any]
    fn: Callable[..., Any]
    options: ResolvedOptions
    acks_late: bool
    ignore_result: bool
    track_started: bool
    time_limit: float | None
    bucket: TokenBucket
    ack_failures: bool
    """task_acks_on_failure_or_timeout: with late acks, a failed task is acknowledged (else dead-lettered)."""
    shared: SharedBucket | None
    """global_rate_limit: a bucket every worker of the broker shares."""

    @classmethod
    def build(cls, app: App, task: Task[Any, Any]) -> TaskRuntime:
        options = app.options_for(task.name)
        if options.soft_time_limit is not None:
            logger.warning(
                "Task %s: soft_time_limit has no effect (a coroutine cannot be interrupted softly); "
                "use time_limit.",
                task.name,
            )
        if not task.is_async and options.time_limit is not None:
            logger.warning(
                "Task %s: time_limit applies to async def tasks only; a thread cannot be stopped.", task.name
            )
        return cls(
            task=task,
            fn=task.checked_fn,
            options=options,
            acks_late=options.acks_late,
            ignore_result=options.ignore_result,
            track_started=options.track_started,
            time_limit=options.time_limit,
            bucket=TokenBucket(parse_rate(options.rate_limit)),
            ack_failures=options.acks_on_failure_or_timeout,
            shared=_shared_bucket(app, task, options.global_rate_limit),
        )


class Executor:
    """Runs deliveries within the concurrency limit and each task's rate limit."""

    def __init__(self, app: App, state: WorkerState, slots: ConcurrencyLimit, hostname: str) -> None:
        self.app, self.backend, self.state, self.slots = app, app.backend, state, slots
        self.hostname = hostname
        self.log_info = logger.isEnabledFor(logging.INFO)
        self.closing = False
        self.observer: Observer = NOTHING
        """Told of each change of a task's state (events, metrics); see :mod:`aqueue.worker.observer`."""
        self.running: set[asyncio.Task[None]] = set()
        """Every task the executor started: runs, rate-limit waits, and the requeue of the line at close."""
        self._waiting: set[asyncio.Task[Any]] = set()
        self._spawn, self._forget = asyncio.get_running_loop().create_task, self.running.discard

    def submit(self, delivery: Delivery, message: Message, runtime: TaskRuntime) -> None:
        """Start a run now if it may, else put it in line for a slot (or let it wait for its token first)."""
        self.observer.after_receive(message)
        if runtime.shared is None and runtime.bucket.try_acquire():
            if self.slots.try_acquire():
                self._start(self._execute(delivery, message, runtime))
            else:
                self.slots.queue(self._begin, delivery, message, runtime)
        else:
            self._start(self._throttled(delivery, message, runtime))

    def close(self) -> None:
        """Start no more tasks: those waiting for a token or a slot give their message back."""
        self.closing = True
        for job in self._waiting:
            job.cancel()
        queued = self.slots.withdraw()
        if queued:
            requeues = asyncio.gather(*(args[0].requeue() for args in queued), return_exceptions=True)
            self._start(self._requeued(requeues))

    def _start(self, run: Coroutine[Any, Any, None]) -> None:
        job = self._spawn(run)
        self.running.add(job)
        job.add_done_callback(self._forget)

    def _begin(self, delivery: Delivery, message: Message, runtime: TaskRuntime) -> None:
        """Start a run from the line: the slot that was released has been handed to it."""
        self._start(self._execute(delivery, message, runtime))

    async def _execute(self, delivery: Delivery, message: Message, runtime: TaskRuntime) -> None:
        """Run holding a slot; then hand the slot to the first in line, or give it back."""
        try:
            await self._run(delivery, message, runtime)
        except asyncio.CancelledError:
            await asyncio.shield(self._give_back(delivery, message))
            raise
        finally:
            self.slots.release()

    async def _throttled(self, delivery: Delivery, message: Message, runtime: TaskRuntime) -> None:
        """Wait for the task's tokens, then take a slot or a place in line like any other delivery."""
        began = time.monotonic()
        try:
            if not self.closing:
                await self._wait(runtime.bucket.acquire)
            if runtime.shared is not None and not self.closing:
                await self._wait(runtime.shared.acquire)
        except asyncio.CancelledError:
            await asyncio.shield(delivery.requeue())
            raise
        self.observer.after_rate_limit(message, time.monotonic() - began)
        if self.closing:
            await delivery.requeue()
        elif self.slots.try_acquire():
            await self._execute(delivery, message, runtime)
        else:
            self.slots.queue(self._begin, delivery, message, runtime)

    async def _wait(self, acquire: Callable[[], Awaitable[None]]) -> None:
        job = asyncio.current_task()
        assert job is not None
        self._waiting.add(job)
        try:
            await acquire()
        finally:
            self._waiting.discard(job)

    @staticmethod
    async def _requeued(requeues: asyncio.Future[list[BaseException | None]]) -> None:
        """Wait until the messages that were in line are given back, even when shutdown stops waiting."""
        try:
            failures = await asyncio.shield(requeues)
        except asyncio.CancelledError:
            await requeues
            raise
        for failure in failures:
            if failure is not None:
                logger.error("Could not give a message back to the broker at shutdown: %s", failure)

    async def _give_back(self, delivery: Delivery, message: Message) -> None:
        if not delivery.settled:
            await delivery.requeue()
        else:
            # Acknowledged when it started, cut short by shutdown: send it again so it is not lost.
            await self.app.send_message(message, delivery.queue, get_serializer(delivery.content_type))
            logger.warning(
                "Task %s[%s] was cut short by shutdown and returned to the queue", message.task, message.id
            )

    async def _run(self, delivery: Delivery, message: Message, runtime: TaskRuntime) -> None:
        task_id, name = message.id, message.task
        if await self._skip(delivery, message):
            return
        if runtime.acks_late:
            if delivery.lost:
                logger.info(
                    "Task %s[%s]: its delivery was lost with the connection before it started; the broker "
                    "delivers it again",
                    name,
                    task_id,
                )
                delivery.drop()
                return
        elif not await self._acked(delivery, message):
            return
        self.state.active[task_id] = (message, time.time(), delivery)
        if runtime.track_started:
            await self._store(
                TaskMeta(task_id, states.STARTED, {"pid": os.getpid(), "hostname": self.hostname}, name=name),
                message,
            )
        self.observer.before_start(message)
        token = _request.set(_context(message, self.hostname, delivery.queue))
        began = time.perf_counter()
        try:
            result = await self._call(runtime, message)
        except Retry as retry:
            await self._retry(delivery, message, runtime, retry)
            self._retried(message, retry)
        except Ignore:
            pass
        except Reject as reject:
            await (delivery.requeue() if reject.requeue else delivery.reject())
            self.observer.after_reject(message, reject.requeue)
        except Exception as exc:
            again = _autoretry(runtime, exc)
            if again is not None:
                await self._retry(delivery, message, runtime, again)
                self._retried(message, again)
            else:
                trace = await self._fail(message, exc)
                self.observer.after_failure(message, exc, trace, time.perf_counter() - began)
                if runtime.acks_late and not runtime.ack_failures:
                    await delivery.reject()  # task_acks_on_failure_or_timeout=False: dead-letter it
        else:
            runtime_s = time.perf_counter() - began
            self.observer.after_success(message, result, runtime_s)
            if self.log_info:
                logger.info("Task %s[%s] succeeded in %.6fs: %r", name, task_id, runtime_s, result)
            if not runtime.ignore_result and not message.ignore_result:
                await self._store(TaskMeta(task_id, states.SUCCESS, result, name=name), message)
        finally:
            _request.reset(token)
            self.state.active.pop(task_id, None)
            self.state.total[name] += 1
        await self._acked(delivery, message)  # lost: the copy that comes again finds the stored state

    async def _acked(self, delivery: Delivery, message: Message) -> bool:
        """Acknowledge; False when the delivery was lost with its connection (it comes again: do not run it)."""
        try:
            await delivery.ack()
        except DeliveryLost:
            logger.info(
                "Task %s[%s]: its delivery was lost with the connection; the broker delivers it again",
                message.task,
                message.id,
            )
            return False
        return True

    async def _skip(self, delivery: Delivery, message: Message) -> bool:
        """Revoked, expired, or already finished (a redelivered copy): ack without running."""
        why = None
        if message.id in self.state.revoked:
            why = "revoked"
        elif message.expires is not None and time.time() > message.expires:
            why = "expired"
        elif delivery.redelivered and await self._finished(message.id):
            logger.info(
                "Task %s[%s] already finished: redelivered copy acknowledged", message.task, message.id
            )
            await self._acked(delivery, message)
            self.observer.after_skip(message, "finished")
            return True
        if why is None:
            return False
        self.observer.after_skip(message, why)
        logger.info("Discarding %s task %s[%s]", why, message.task, message.id)
        await self._acked(delivery, message)
        await self.backend.store(TaskMeta(message.id, states.REVOKED, why, name=message.task), message)
        return True

    async def _finished(self, task_id: str) -> bool:
        try:
            return (await self.backend.get(task_id)).ready
        except Exception:
            return False

    async def _call(self, runtime: TaskRuntime, message: Message) -> Any:
        task, fn = runtime.task, runtime.fn
        args = (task, *message.args) if task.bind else message.args
        if not task.is_async:
            call = functools.partial(fn, *args, **message.kwargs)
            return await anyio.to_thread.run_sync(call)
        if runtime.time_limit is None:
            return await fn(*args, **message.kwargs)
        try:
            async with asyncio.timeout(runtime.time_limit):
                return await fn(*args, **message.kwargs)
        except TimeoutError as exc:
            raise TimeLimitExceeded(
                f"Task {task.name}[{message.id}] exceeded its time limit of {runtime.time_limit}s"
            ) from exc

    async def _retry(self, delivery: Delivery, message: Message, runtime: TaskRuntime, retry: Retry) -> None:
        when = retry.when or 0.0
        again = replace(message, retries=message.retries + 1, eta=time.time() + when if when else None)
        await self.app.send_message(again, delivery.queue, get_serializer(delivery.content_type))
        logger.info(
            "Task %s[%s] retry: Retry in %ss%s",
            message.task,
            message.id,
            when,
            f": {retry.exc!r}" if retry.exc else "",
        )
        if not runtime.ignore_result:
            meta = TaskMeta(
                message.id,
                states.RETRY,
                exception_to_result(retry.exc or retry),
                format_traceback(retry.exc) if retry.exc else None,
                name=message.task,
            )
            await self._store(meta, message)

    async def _fail(self, message: Message, exc: Exception) -> str:
        trace = format_traceback(exc)
        logger.error("Task %s[%s] raised unexpected: %r\n%s", message.task, message.id, exc, trace.rstrip())
        meta = TaskMeta(message.id, states.FAILURE, exception_to_result(exc), trace, name=message.task)
        await self._store(meta, message)
        return trace

    def _retried(self, message: Message, retry: Retry) -> None:
        if self.observer is not NOTHING:
            trace = format_traceback(retry.exc) if retry.exc else None
            self.observer.after_retry(message, retry.exc or retry, trace)

    async def _store(self, meta: TaskMeta, message: Message) -> None:
        try:
            await self.backend.store(meta, message)
        except Exception as exc:
            if meta.status == states.SUCCESS and not isinstance(exc, OperationalError):
                # The return value cannot be encoded: fail the task, as Celery does, so get() does not hang.
                await self._fail(message, _unencodable(message, meta, self.backend.serializer.name, exc))
                return
            logger.error(
                "Cannot store the %s state of task %s[%s]: %s", meta.status, message.task, message.id, exc
            )


def _unencodable(message: Message, meta: TaskMeta, serializer: str, exc: Exception) -> EncodeError:
    return EncodeError(
        f"The result of {message.task}[{message.id}] ({type(meta.result).__name__}) "
        f"cannot be serialized with {serializer}: {exc}"
    )


def _shared_bucket(app: App, task: Task[Any, Any], rate: str | float | None) -> SharedBucket | None:
    parsed = parse_rate(rate)
    if parsed is None:
        return None
    if type(app.broker).take_token is Broker.take_token:
        raise ImproperlyConfigured(
            f"Task {task.name} has global_rate_limit={rate!r}, but the {type(app.broker).__name__} keeps no "
            "rate-limit store its workers share: use a redis:// or sqlite:// broker (memory:// within one process), "
            "or rate_limit (per worker) instead."
        )
    return SharedBucket(app.broker, task.name, parsed)


def _autoretry(runtime: TaskRuntime, exc: Exception) -> Retry | None:
    """The Retry that ``autoretry_for`` asks for, or None (also when the retry limit is reached).

    ``retry_kwargs`` are passed to ``retry()``; ``retry_backoff`` sets the countdown to Celery's
    exponential backoff (``factor * 2**retries`` seconds, at most ``retry_backoff_max``, drawn at random
    below that with ``retry_jitter``).
    """
    options = runtime.options
    if not (options.autoretry_for and isinstance(exc, options.autoretry_for)):
        return None
    kwargs = dict(options.retry_kwargs)
    if options.retry_backoff:
        factor = max(1, int(options.retry_backoff))
        countdown = min(options.retry_backoff_max, factor * 2**runtime.task.request.retries)
        kwargs["countdown"] = random.uniform(0, countdown) if options.retry_jitter else countdown
    try:
        runtime.task.retry(exc=exc, **kwargs)
    except Retry as retry:
        return retry
    except Exception:
        return None
    return None


def _context(message: Message, hostname: str, queue: str) -> Context:
    return Context(
        id=message.id,
        task=message.task,
        args=message.args,
        kwargs=message.kwargs,
        retries=message.retries,
        eta=message.eta,
        expires=message.expires,
        hostname=hostname,
        delivery_info={"routing_key": queue, "priority": message.priority},
        headers=message.headers,
        root_id=message.root,
        parent_id=message.parent_id,
        group=message.group,
        group_index=message.group_index,
        callbacks=message.callbacks,
        errbacks=message.errbacks,
        chain=message.chain,
        chord=message.chord,
        called_directly=False,
    )
