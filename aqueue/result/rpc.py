"""rpc:// — task states sent back to the client over RabbitMQ, like Celery's rpc backend.

Each backend object (one per client process) owns one exclusive, auto-delete reply queue, declared
by ``connect()``. ``prepare()`` sets ``reply_to`` of every message this process publishes to that
queue and remembers the task id. In the worker, ``store()`` publishes each state (STARTED, RETRY,
SUCCESS, FAILURE, ...) to the message's ``reply_to`` through the default exchange, with the task id
as ``correlation_id``; replies are not persistent, since the reply queue is not durable either, and
``expires`` becomes their TTL. One consumer on the reply queue keeps the latest state of each task
id in memory and wakes whoever waits for it.

Limits, as in Celery: only the process that sent a task receives its states, so ``wait()`` on any
other id raises at once instead of waiting forever, and ``get()`` elsewhere says PENDING; states sent
while the client is disconnected are lost (the exclusive reply queue goes with the connection, and
the robust connection declares it again); ``forget()`` drops what this client holds. The most recent
``max_tasks`` (100,000) task ids sent are remembered, older ones are forgotten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel

from aqueue.broker.amqp import AMQPBroker
from aqueue.exceptions import AqueueError, ImproperlyConfigured, OperationalError, SerializationError
from aqueue.exceptions import TimeoutError as WaitTimeout
from aqueue.message import Message
from aqueue.result.base import ResultBackend, TaskMeta, now_iso
from aqueue.serialization import serializer_for
from aqueue.urls import mask_password

__all__ = ["RPCBackend"]

log = logging.getLogger(__name__)

_AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
_SAFE_CONTENT = frozenset({"application/json", "application/x-msgpack"})
_RECONNECTING = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError)
_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class _NotSentHere(AqueueError):
    """wait() on a task this client did not send: rpc:// would never deliver its result here."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"Task {task_id} was not sent by this client: the rpc:// result backend delivers results "
            "only to the process that sent the task (and only while it is connected). Use a backend "
            "that stores results, such as redis:// or sqlite://, to read them from another process."
        )


class RPCBackend(ResultBackend):
    """Results as replies over the AMQP broker at ``broker_url``.

    Raises:
        ImproperlyConfigured: ``broker_url`` is not an AMQP URL.
    """

    max_tasks = 100_000
    """How many task ids sent by this client are remembered, with their latest state."""

    def __init__(
        self,
        url: str = "rpc://",
        serializer: str = "json",
        expires: float | None = None,
        *,
        broker_url: str | None,
    ) -> None:
        super().__init__(url, serializer, expires)
        if not broker_url or not broker_url.startswith(_AMQP_SCHEMES):
            shown = mask_password(broker_url) if broker_url else "none"
            raise ImproperlyConfigured(
                f"The rpc:// result backend sends results over an AMQP broker, but the broker is {shown!r}. "
                "Use an amqp:// broker, or another result backend such as redis:// or sqlite://."
            )
        self.broker = AMQPBroker(broker_url)
        self.reply_to = f"aqueue.reply.{uuid.uuid4().hex}"
        self._sent: OrderedDict[str, TaskMeta | None] = OrderedDict()
        self._waiters: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        """Declare this client's reply queue and start consuming it."""
        async with self._lock:
            if self._channel is not None:
                return
            channel = await self.broker.channel(confirms=True)
            with self._errors("declare the reply queue on"):
                queue = await channel.declare_queue(self.reply_to, exclusive=True, auto_delete=True)
                await queue.consume(self._received, no_ack=True)
            self._channel = channel

    async def aclose(self) -> None:
        """Close the connection; whoever still waits gets OperationalError."""
        self._channel = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(OperationalError("The rpc:// result backend was closed."))
        await self.broker.aclose()

    def prepare(self, message: Message) -> None:
        """Ask for ``message``'s states to be sent to this client's reply queue."""
        message.reply_to = self.reply_to
        if message.id not in self._sent:
            self._sent[message.id] = None
            while len(self._sent) > self.max_tasks:
                self._sent.popitem(last=False)

    async def store(self, meta: TaskMeta, request: Message | None = None) -> None:
        """Send ``meta`` to the client that sent ``request``; nothing to do when it asked for no reply."""
        if request is None or not request.reply_to:
            return
        if meta.date_done is None and meta.ready:
            meta.date_done = now_iso()
        reply = aio_pika.Message(
            self.serializer.dumps(meta.to_dict()),
            content_type=self.serializer.content_type,
            correlation_id=meta.task_id,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            expiration=self.expires,
        )
        await self.connect()
        with self._errors("send a result to"):
            try:
                await self._send(reply, request.reply_to)
            except _RECONNECTING:
                # The connection dropped under this send; the robust connection is coming back.
                await self._send(reply, request.reply_to)

    async def _send(self, reply: aio_pika.Message, reply_to: str) -> None:
        channel = self._channel
        if channel is None:
            raise OperationalError("The rpc:// result backend is closed.")
        await asyncio.wait_for(channel.ready(), self.broker.connect_timeout)
        await channel.default_exchange.publish(reply, reply_to, mandatory=False)

    async def get(self, task_id: str) -> TaskMeta:
        """The latest state received for ``task_id``; PENDING when none."""
        meta = self._sent.get(task_id)
        return TaskMeta(task_id) if meta is None else dataclasses.replace(meta)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskMeta:
        """Wait for the reply that makes ``task_id`` ready.

        Raises:
            AqueueError: ``task_id`` was not sent by this client, so its result never comes here.
            TimeoutError: ``timeout`` seconds passed first.
        """
        await self.connect()
        if task_id not in self._sent:
            raise _NotSentHere(task_id)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[task_id].add(waiter)
        try:
            if not (await self.get(task_id)).ready:
                await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise WaitTimeout(f"The operation timed out waiting for task {task_id}.") from None
        finally:
            self._discard(task_id, waiter)
        return await self.get(task_id)

    async def forget(self, task_id: str) -> None:
        """Drop what this client holds for ``task_id``; it is PENDING afterwards."""
        await self._delete(task_id)

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        if task_id in self._sent:
            self._sent[task_id] = meta
            if meta.ready:
                for waiter in self._waiters.get(task_id, ()):
                    if not waiter.done():
                        waiter.set_result(None)

    async def _get(self, task_id: str) -> bytes | None:
        meta = self._sent.get(task_id)
        return None if meta is None else self.serializer.dumps(meta.to_dict())

    async def _delete(self, task_id: str) -> None:
        self._sent.pop(task_id, None)

    async def _received(self, message: AbstractIncomingMessage) -> None:
        task_id = message.correlation_id
        if task_id is None or task_id not in self._sent:
            return  # forgotten, or for an earlier client that used this queue name
        try:
            content_type = message.content_type or self.serializer.content_type
            if content_type == self.serializer.content_type:
                decoded = self.serializer.decode(message.body)
            else:
                decoded = serializer_for(content_type, _SAFE_CONTENT).decode(message.body)
            meta = TaskMeta.from_dict(decoded)
        except SerializationError as exc:
            log.warning("Ignoring a reply for task %s that cannot be decoded: %s", task_id, exc)
            return
        await self._set(task_id, message.body, meta)

    def _discard(self, task_id: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(task_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[task_id]

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except _ERRORS as exc:
            raise OperationalError(
                f"Cannot {action} RabbitMQ at {mask_password(self.broker.url)}: {exc}"
            ) from exc
