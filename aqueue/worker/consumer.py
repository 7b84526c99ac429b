"""The consumer loop: deliveries within the prefetch window, decode, reject bad ones, hand over."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable
from typing import Any

from aqueue import states
from aqueue.broker.base import Consumer, Delivery
from aqueue.exceptions import ContentDisallowed, DecodeError, NotRegistered
from aqueue.message import Codec, Message
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.result.failure import exception_to_result
from aqueue.worker.execution import Executor, TaskRuntime

__all__ = ["ConsumerLoop"]

logger = logging.getLogger("aqueue.worker")


class ConsumerLoop:
    """Takes deliveries from a consumer and hands each good message to the executor."""

    def __init__(
        self,
        consumer: Consumer,
        runtimes: dict[str, TaskRuntime],
        executor: Executor,
        backend: ResultBackend,
        accepted: frozenset[str],
        codec: Codec,
        intake: AsyncIterable[Delivery] | None = None,
    ) -> None:
        """``intake``: where deliveries come from, if not straight from ``consumer`` (a quota)."""
        self.consumer, self.runtimes, self.executor = consumer, runtimes, executor
        self.intake = consumer if intake is None else intake
        self.backend, self.accepted, self.codec = backend, accepted, codec
        self.running = executor.running

    async def run(self) -> None:
        """Consume until cancelled."""
        log_info = logger.isEnabledFor(logging.INFO)
        runtimes, accepted, submit, decode = (
            self.runtimes,
            self.accepted,
            self.executor.submit,
            self.codec.decode,
        )
        async for delivery in self.intake:
            try:
                try:
                    message = decode(
                        delivery.body, delivery.content_type, delivery.headers, accepted, delivery.properties
                    )
                except (ContentDisallowed, DecodeError) as exc:
                    await self._bad(delivery, exc)
                    continue
                runtime = runtimes.get(message.task)
                if runtime is None:
                    await self._unregistered(delivery, message)
                    continue
                if log_info:
                    logger.info("Task %s[%s] received", message.task, message.id)
                submit(delivery, message, runtime)
            except Exception as exc:  # one message never stops the loop
                await self._failed(delivery, exc)

    async def _bad(self, delivery: Delivery, exc: Exception) -> None:
        kind = "refused" if isinstance(exc, ContentDisallowed) else "undecodable"
        logger.error(
            "Rejecting %s message %s from queue %r: %s. It was not run and has been dead-lettered.",
            kind,
            delivery.id,
            delivery.queue,
            exc,
        )
        await delivery.reject()

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        """Handling ``delivery`` raised (its settle failed in an outage, or a bug): log it and go on."""
        if not delivery.settled:
            logger.error(
                "Rejecting message %s from queue %r: handling it failed: %r. It was not run and is dead-lettered.",
                delivery.id, delivery.queue, exc, exc_info=exc,
            )  # fmt: skip
            try:
                await delivery.reject()
                return
            except Exception as again:
                exc = again
        logger.error(
            "Message %s from queue %r could not be settled (%s); the broker delivers it again.",
            delivery.id, delivery.queue, exc,
        )  # fmt: skip

    async def _unregistered(self, delivery: Delivery, message: Message) -> None:
        logger.error(
            "Received unregistered task of type %r (id %s). The message has been ignored, not run, and "
            "dead-lettered. Did you import the module that defines it (worker -A, or the 'imports' setting)?",
            message.task,
            message.id,
        )
        await delivery.reject()
        self.executor.observer.after_unknown(message)
        failure: Any = exception_to_result(NotRegistered(message.task))
        try:
            await self.backend.store(
                TaskMeta(message.id, states.FAILURE, failure, name=message.task), message
            )
        except Exception as exc:
            logger.debug("Could not record the unregistered task %s: %s", message.id, exc)
