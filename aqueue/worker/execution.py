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
from aqueue.worker.timelimits import run_limited
from aqueue.worker.workflow import Workflow

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["Executor", "TaskRuntime"]

logger = logging.getLogger("aqueue.worker")

STORE_RETRY_FOR = 20.0
"""Seconds a worker keeps trying to store a task's final state while the result backend fails."""
_STORE_PAUSES = (0.1, 2.0)
"""The first pause between two tries to store a state, doubling up to the second."""


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
    soft_time_limit: float | None
    bucket: TokenBucket
    ack_failures: bool
    """task_acks_on_failure_or_timeout: with late acks, a failed task is acknowledged (else dead-lettered)."""
    shared: SharedBucket | None
    """global_rate_limit: a bucket every worker of the broker shares."""

    @classmethod
    def build(cls, app: App, task: Task[Any, Any]) -> TaskRuntime:
        options = app.options_for(task.name)
        if not task.is_async and (options.time_limit is not None or options.soft_time_limit is not None):
            logger.warning(
                "Task %s: a plain def task runs in a thread, which time limits cannot interrupt; one that "
                "returns past its time_limit fails with TimeLimitExceeded (make it async def to interrupt it).",
                task.name,
            )
        return cls(
            task=task,
            fn=task.checked_fn,
            options=options,
            acks_late=options.acks_late,
            ignore_result=options.ignore_result,
            track_started=options.track_started,
            time_limit=options.time_limit,
            soft_time_limit=options.soft_time_limit,
            bucket=TokenBucket(parse_rate(options.rate_limit)),
            ack_failures=options.acks_on_failure_or_timeout,
            shared=_shared_bucket(app, task, options.global_rate_limit),
        )


class Executor:
    """Runs deliveries within the concurrency limit and each task's rate limit."""

    def __init__(self, app: App, state: WorkerState, slots: ConcurrencyLimit, hostname: str) -> None:
        self.app, self.backend, self.state, self.slots = app, app.backend, state, slots
        self.workflow = Workflow(app)
        self.hostname = hostname
        self.log_info = logger.isEnabledFor(logging.INFO)
        self.closing = False
        self.observer: Observer = NOTHING
        """Told of each change of a task's state (events, metrics); see :mod:`aqueue.worker.observer`."""
        self.running: set[asyncio.Task[None]] = set()
        """Every task the executor started: runs, rate-limit waits, and the requeue of the line at close."""
        self._waiting: set[asyncio.Task[Any]] = set()
        self._spawn, self._forget = asyncio.get_running_loop().create_task, self.running.discard
        self.store_retry_for = STORE_RETRY_FOR
        self._copies: dict[str, list[Delivery]] = {}
        """Redelivered copies of tasks running here, by task id: settled when that run ends."""

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
            if self._copies:
                await asyncio.shield(self._settle_copies(message, ran=False))
            raise
        except Exception as exc:
            await self._broken(delivery, message, exc)
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
        except Exception as exc:  # the broker keeping a global_rate_limit bucket failed
            await self._broken(delivery, message, exc)
            return
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
        self.state.active[task_id] = (
            message,
            time.time(),
            delivery,
        )  # already: a copy arriving meanwhile is held
        if not (self._kept(delivery, message) if runtime.acks_late else await self._acked(delivery, message)):
            self.state.active.pop(task_id, None)
            if self._copies:
                await self._settle_copies(message, ran=False)
            return
        if runtime.track_started:
            await self._store(
                TaskMeta(task_id, states.STARTED, {"pid": os.getpid(), "hostname": self.hostname}, name=name),
                message,
            )
        self.observer.before_start(message)
        token = _request.set(_context(message, self.hostname, delivery.queue))
        began = time.perf_counter()
        stored = True
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
                trace = format_traceback(exc)
                stored = await self._fail(message, exc, trace)
                self.observer.after_failure(message, exc, trace, time.perf_counter() - began)
                if stored and (message.errbacks or message.chain or message.chord):
                    await self._follow(self.workflow.failed(message, exc, trace), message)
                if stored and runtime.acks_late and not runtime.ack_failures:
                    await delivery.reject()  # task_acks_on_failure_or_timeout=False: dead-letter it
        else:
            runtime_s = time.perf_counter() - began
            self.observer.after_success(message, result, runtime_s)
            if self.log_info:
                logger.info("Task %s[%s] succeeded in %.6fs: %r", name, task_id, runtime_s, result)
            if not runtime.ignore_result and not message.ignore_result:
                stored = await self._store(TaskMeta(task_id, states.SUCCESS, result, name=name), message)
            if stored and (message.callbacks or message.chain or message.chord):
                await self._follow(self.workflow.succeeded(message, result), message)
        finally:
            _request.reset(token)
            self.state.active.pop(task_id, None)
            self.state.total[name] += 1
        if stored:
            await self._acked(delivery, message)  # lost: the copy that comes again finds the stored state
        else:
            await self._unstored(delivery, message, runtime)
        if self._copies:
            await self._settle_copies(message, ran=True)

    def _kept(self, delivery: Delivery, message: Message) -> bool:
        """Whether an acks-late delivery is still held; False when it was lost (it comes again: do not run it)."""
        if delivery.lost:
            logger.info(
                "Task %s[%s]: its delivery was lost with the connection before it started; the broker "
                "delivers it again",
                message.task,
                message.id,
            )
            delivery.drop()
            return False
        return True

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
        except OperationalError as exc:
            logger.warning(
                "Task %s[%s]: the message could not be acknowledged (%s); the broker delivers it again, "
                "and a copy of a finished task is acknowledged without running",
                message.task,
                message.id,
                exc,
            )
            return False
        return True

    async def _skip(self, delivery: Delivery, message: Message) -> bool:
        """Revoked, expired, or a redelivered copy of a task running or finished: settle without running."""
        why = None
        if message.id in self.state.revoked:
            why = "revoked"
        elif message.expires is not None and time.time() > message.expires:
            why = "expired"
        elif delivery.redelivered:
            return await self._copy(delivery, message)
        if why is None:
            return False
        self.observer.after_skip(message, why)
        logger.info("Discarding %s task %s[%s]", why, message.task, message.id)
        await self._acked(delivery, message)
        revoked = TaskMeta(message.id, states.REVOKED, why, name=message.task)
        if await self._store(revoked, message) and message.chord is not None:
            await self._follow(self.workflow.chord_part(message, revoked), message)
        return True

    async def _copy(self, delivery: Delivery, message: Message) -> bool:
        """A redelivered or re-sent copy: True when it must not run (its task is running here or finished)."""
        if message.id in self.state.active:
            logger.info(
                "Task %s[%s] is running: its redelivered copy is acknowledged when that run ends",
                message.task,
                message.id,
            )
            self._copies.setdefault(message.id, []).append(delivery)
            return True
        if await self._finished(message):
            logger.info(
                "Task %s[%s] already finished: redelivered copy acknowledged", message.task, message.id
            )
            if message.chord is not None:  # its worker may have died before the chord's callback was sent
                await self._follow(self.workflow.recover(message), message)
            await self._acked(delivery, message)
            self.observer.after_skip(message, "finished")
            return True
        return False

    async def _follow(self, step: Awaitable[None], message: Message) -> None:
        """Run what a workflow does after ``message``'s task; a failure there is logged, not raised."""
        try:
            await step
        except Exception as exc:
            logger.error(
                "Task %s[%s]: could not carry its workflow on: %s",
                message.task,
                message.id,
                exc,
                exc_info=True,
            )

    async def _settle_copies(self, message: Message, ran: bool) -> None:
        """The run of ``message`` ended: acknowledge the copies held meanwhile, or give them back if it did not run."""
        for copy in self._copies.pop(message.id, ()):
            try:
                await (copy.ack() if ran else copy.requeue())
            except Exception as exc:
                logger.warning(
                    "Task %s[%s]: could not settle a redelivered copy: %s", message.task, message.id, exc
                )

    async def _finished(self, message: Message) -> bool:
        try:
            return (await self.backend.get(message.id)).ready
        except OperationalError as exc:
            logger.warning(
                "Task %s[%s]: cannot tell whether it already finished (%s); running the redelivered copy",
                message.task,
                message.id,
                exc,
            )
        except Exception:
            pass  # no result backend, or a state stored by something else: nothing says it finished
        return False

    async def _call(self, runtime: TaskRuntime, message: Message) -> Any:
        task, fn = runtime.task, runtime.fn
        args = (task, *message.args) if task.bind else message.args
        hard = runtime.time_limit if message.time_limit is None else message.time_limit
        soft = runtime.soft_time_limit if message.soft_time_limit is None else message.soft_time_limit
        if not task.is_async:
            began = time.monotonic()
            result = await anyio.to_thread.run_sync(functools.partial(fn, *args, **message.kwargs))
            if (
                hard is not None and time.monotonic() - began > hard
            ):  # a thread cannot be stopped: fail it late
                raise TimeLimitExceeded(
                    f"Task {task.name}[{message.id}] returned past its time limit of {hard}s"
                )
            return result
        if hard is None and soft is None:
            return await fn(*args, **message.kwargs)
        return await run_limited(fn(*args, **message.kwargs), soft, hard, f"Task {task.name}[{message.id}]")

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

    async def _fail(self, message: Message, exc: Exception, trace: str | None = None) -> bool:
        trace = trace or format_traceback(exc)
        logger.error("Task %s[%s] raised unexpected: %r\n%s", message.task, message.id, exc, trace.rstrip())
        meta = TaskMeta(message.id, states.FAILURE, exception_to_result(exc), trace, name=message.task)
        return await self._store(meta, message)

    def _retried(self, message: Message, retry: Retry) -> None:
        if self.observer is not NOTHING:
            trace = format_traceback(retry.exc) if retry.exc else None
            self.observer.after_retry(message, retry.exc or retry, trace)

    async def _store(self, meta: TaskMeta, message: Message) -> bool:
        """Store ``meta``; False when it is a final state the result backend failed to take in time."""
        try:
            await self.backend.store(meta, message)
        except OperationalError as exc:
            return await self._store_again(meta, message, exc)
        except Exception as exc:
            if meta.status == states.SUCCESS:
                # The return value cannot be encoded: fail the task, as Celery does, so get() does not hang.
                return await self._fail(
                    message, _unencodable(message, meta, self.backend.serializer.name, exc)
                )
            logger.error(
                "Cannot store the %s state of task %s[%s]: %s", meta.status, message.task, message.id, exc
            )
        return True

    async def _store_again(self, meta: TaskMeta, message: Message, exc: OperationalError) -> bool:
        """Retry storing a final state with backoff for ``store_retry_for`` seconds (other states: once only)."""
        what = f"the {meta.status} state of task {message.task}[{message.id}]"
        if not meta.ready:
            logger.error("Cannot store %s: %s", what, exc)
            return True
        logger.warning("Cannot store %s (%s); retrying for up to %.0fs", what, exc, self.store_retry_for)
        deadline, (pause, longest) = time.monotonic() + self.store_retry_for, _STORE_PAUSES
        while time.monotonic() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
            try:
                await self.backend.store(meta, message)
            except OperationalError as again:
                exc = again
                continue
            logger.info("Stored %s: the result backend is back", what)
            return True
        logger.error("Cannot store %s after %.0fs: %s", what, self.store_retry_for, exc)
        return False

    async def _unstored(self, delivery: Delivery, message: Message, runtime: TaskRuntime) -> None:
        """A task whose final state could not be stored: an acks-late message is given back, not acknowledged."""
        if not runtime.acks_late:
            logger.error(
                "Task %s[%s]: its result is lost: the message was acknowledged when the task started "
                "(acks_late is off)",
                message.task,
                message.id,
            )
            return
        logger.error(
            "Task %s[%s]: its result could not be stored, so the message is not acknowledged: it goes back "
            "to the queue and the task runs again",
            message.task,
            message.id,
        )
        try:
            await delivery.requeue()
        except OperationalError as exc:
            logger.warning(
                "Task %s[%s]: giving the message back failed too (%s); the broker delivers it again",
                message.task,
                message.id,
                exc,
            )

    async def _broken(self, delivery: Delivery, message: Message, exc: Exception) -> None:
        """A run failed outside the task's code: log it and settle the message, so it holds no prefetch slot.

        A broker or backend error gives it back to the queue; anything else dead-letters it.
        """
        outage = isinstance(exc, OperationalError)
        fate = "it goes back to the queue" if outage else "it has been dead-lettered"
        if delivery.settled:
            fate = "it was acknowledged already"
        logger.error(
            "Task %s[%s]: the worker failed while handling it: %r; %s",
            message.task,
            message.id,
            exc,
            fate,
            exc_info=None if outage else exc,
        )
        try:
            await (delivery.requeue() if outage else delivery.reject())
        except Exception as again:
            logger.warning(
                "Task %s[%s]: settling the message failed too: %s", message.task, message.id, again
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
