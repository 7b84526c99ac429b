"""rpc:// — task states sent back to the client over RabbitMQ, like Celery's rpc backend.

Each backend object (one per client process) owns one exclusive, auto-delete reply queue, declared
by ``connect()``. ``prepare()`` sets ``reply_to`` of every message this process publishes to that
queue, remembers the task id, and adds the header ``aqueue_rpc_batch`` (which Celery ignores) to say
that this client reads batched replies. In the worker, ``store()`` publishes each state (STARTED,
RETRY, SUCCESS, FAILURE, ...) to the message's ``reply_to`` through the default exchange, exactly as
Celery's rpc backend does: the state in Celery's layout as the body, the task id as
``correlation_id``, not persistent (delivery mode 1). So a Celery client's ``result.get()`` reads an
aqueue worker's replies, and an aqueue client reads a Celery worker's. States stored during one
event-loop turn for a client whose message carried the header travel as one message, a list with the
AMQP ``type`` ``aqueue.rpc.batch`` (so a busy worker sends one reply per client per turn, not one per
task); any other client gets one message per state. Replies are published with confirms, and
``store()`` returns once RabbitMQ confirmed its reply; the worker acknowledges the task only after
that. One consumer on the reply queue keeps the latest state of each task id in memory and wakes
whoever waits for it.

Limits, as in Celery: only the process that sent a task receives its states, so ``wait()`` on any
other id raises at once instead of waiting forever, and ``get()`` elsewhere says PENDING; states sent
while the client is disconnected are lost (the exclusive reply queue goes with the connection, and
the robust connection declares it again); ``forget()`` drops what this client holds. The most recent
``max_tasks`` (100,000) task ids sent are remembered, older ones are forgotten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractRobustChannel

from aqueue.broker import amqp_reader
from aqueue.broker.amqp import AMQPBroker
from aqueue.broker.amqp_wire import Outbox, encode_properties
from aqueue.exceptions import AqueueError, ImproperlyConfigured, OperationalError, SerializationError
from aqueue.exceptions import TimeoutError as WaitTimeout
from aqueue.message import Message
from aqueue.result.base import ResultBackend, TaskMeta
from aqueue.serialization import serializer_for
from aqueue.urls import mask_password

__all__ = ["BATCH_HEADER", "RPCBackend"]

_BATCH = "aqueue.rpc.batch"
"""The AMQP ``type`` of a reply message carrying a list of states (for several tasks) instead of one."""
BATCH_HEADER = "aqueue_rpc_batch"
"""The task message header by which a client says that it reads batched replies."""
_Reply = tuple[dict[str, Any], bytes, "asyncio.Future[None]", int]
"""A state to send, encoded, who waits for its confirm, and how many sends the connection dropped under."""

log = logging.getLogger(__name__)

_AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
_BATCHES: dict[str, Any] = {BATCH_HEADER: True}
"""The headers of a message that had none: one mapping shared by all (the codec only reads it)."""
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
        self._outbox: Outbox | None = None
        self._outgoing: dict[tuple[str, bool], list[_Reply]] = {}
        """States to send, by reply queue and whether its client reads batches."""
        self._sending: asyncio.Task[None] | None = None
        self._filling = False
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        """Declare this client's reply queue and start consuming it."""
        async with self._lock:
            if self._channel is not None:
                return
            channel = await self.broker.channel(confirms=True)
            with self._errors("declare the reply queue on"):
                await channel.declare_queue(self.reply_to, exclusive=True, auto_delete=True)
                await self._consume(channel)
            channel.reopen_callbacks.add(self._consume)  # type: ignore[arg-type]
            self._channel = channel

    async def _consume(self, channel: AbstractRobustChannel) -> None:
        """Consume the reply queue on ``channel``'s current aiormq channel (again, after a reconnect)."""
        self._outbox = outbox = await Outbox.current(self._outbox, channel, self.broker.connect_timeout)
        await amqp_reader.consume(outbox.channel, self.reply_to, self._received, no_ack=True)

    async def aclose(self) -> None:
        """Close the connection; whoever still waits gets OperationalError."""
        self._channel, self._outbox = None, None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(OperationalError("The rpc:// result backend was closed."))
        await self.broker.aclose()

    def prepare(self, message: Message) -> None:
        """Ask for ``message``'s states to be sent to this client's reply queue, batched, unless it names
        another (a workflow step sent by a worker replies, unbatched, to the client that sent the workflow)."""
        if not message.reply_to:
            message.reply_to = self.reply_to
            message.headers = {**message.headers, BATCH_HEADER: True} if message.headers else _BATCHES
        if message.id not in self._sent:
            self._sent[message.id] = None
            while len(self._sent) > self.max_tasks:
                self._sent.popitem(last=False)

    async def store(self, meta: TaskMeta, request: Message | None = None) -> None:
        """Send ``meta`` to the client that sent ``request``; nothing to do when it asked for no reply."""
        if request is None or not request.reply_to:
            return
        meta.complete(request)
        state = meta.to_dict()
        body = self.serializer.dumps(state)  # a result that cannot be encoded raises here, for this task only
        if self._channel is None:
            await self.connect()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batches = bool(request.headers and request.headers.get(BATCH_HEADER))
        self._outgoing.setdefault((request.reply_to, batches), []).append((state, body, waiter, 0))
        self._send_soon()
        with self._errors("send a result to"):
            await waiter

    def _send_soon(self) -> None:
        """Have the queued states sent: with the outbox's next write, or by a task after a reconnect."""
        if self._sending is not None or self._filling:
            return
        outbox = self._outbox
        if outbox is not None and not outbox.closed:
            self._filling = True
            outbox.before_write(self._fill)
        else:
            self._sending = asyncio.create_task(self._send_outgoing())

    def _fill(self, outbox: Outbox) -> None:
        self._filling = False
        outgoing, self._outgoing = self._outgoing, {}
        self._publish(outbox, outgoing)

    async def _send_outgoing(self) -> None:
        """Send the queued states once the channel is back."""
        try:
            while self._outgoing:
                outgoing, self._outgoing = self._outgoing, {}
                try:
                    if self._channel is None:
                        raise OperationalError("The rpc:// result backend is closed.")
                    outbox = await Outbox.current(self._outbox, self._channel, self.broker.connect_timeout)
                    self._outbox = outbox
                except Exception as exc:
                    for replies in outgoing.values():
                        _settle([waiter for *_, waiter, _ in replies], exc)
                    continue
                self._publish(outbox, outgoing)
        finally:
            self._sending = None

    def _publish(self, outbox: Outbox, outgoing: dict[tuple[str, bool], list[_Reply]]) -> None:
        """One message per batch-reading client, else one per state; confirms settle the waiters."""
        for key, replies in outgoing.items():
            reply_to, batches = key
            for sent in [replies] if batches else [[reply] for reply in replies]:
                try:
                    confirmed = outbox.publish("", reply_to, *self._reply(sent))
                except _RECONNECTING as exc:
                    self._again(key, sent, exc)
                    continue
                if confirmed is None:
                    _settle([waiter for *_, waiter, _ in sent], None)
                else:
                    confirmed.add_done_callback(functools.partial(self._confirmed, key, sent))

    def _reply(self, replies: list[_Reply]) -> tuple[bytes, bytes]:
        """One reply message: a single state exactly as Celery's rpc backend sends it, or a batch."""
        content_type = self.serializer.content_type
        encoding = "utf-8" if content_type == "application/json" else "binary"
        if len(replies) == 1:
            state, body, _, _ = replies[0]
            # Not persistent (delivery mode 1), as Celery's (result_persistent is off by default).
            properties = encode_properties(
                content_type=content_type,
                content_encoding=encoding,
                delivery_mode=1,
                priority=0,
                correlation_id=state["task_id"],
            )
            return properties, body
        properties = encode_properties(
            content_type=content_type, content_encoding=encoding, delivery_mode=1, message_type=_BATCH
        )
        if content_type == "application/json":
            return properties, b"[" + b",".join(body for _, body, _, _ in replies) + b"]"
        return properties, self.serializer.dumps([state for state, _, _, _ in replies])

    def _confirmed(
        self, key: tuple[str, bool], replies: list[_Reply], confirmed: asyncio.Future[Any]
    ) -> None:
        exc = None if confirmed.cancelled() else confirmed.exception()
        if isinstance(exc, _RECONNECTING):
            self._again(key, replies, exc)
        else:
            _settle([waiter for *_, waiter, _ in replies], exc)

    def _again(self, key: tuple[str, bool], replies: list[_Reply], exc: BaseException) -> None:
        """Send once more after a reconnect the replies whose send the connection dropped under."""
        failed = [waiter for *_, waiter, attempts in replies if attempts]
        _settle(failed, exc)
        retry = [(state, body, waiter, 1) for state, body, waiter, attempts in replies if not attempts]
        if retry:
            self._outgoing.setdefault(key, []).extend(retry)
            self._send_soon()

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
        if task_id not in self._sent:
            raise _NotSentHere(task_id)
        meta = self._sent[task_id]
        if meta is not None and meta.ready:
            return meta
        if self._channel is None:
            await self.connect()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[task_id].add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise WaitTimeout(f"The operation timed out waiting for task {task_id}.") from None
        finally:
            self._discard(task_id, waiter)
        return self._sent.get(task_id) or TaskMeta(task_id)

    async def forget(self, task_id: str) -> None:
        """Drop what this client holds for ``task_id``; it is PENDING afterwards."""
        await self._delete(task_id)

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        self._keep(meta)

    def _keep(self, meta: TaskMeta) -> None:
        """Hold ``meta`` if this client sent its task, and wake who waits for it when it is ready."""
        task_id = meta.task_id
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

    def _received(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        batch = properties.message_type == _BATCH
        task_id = properties.correlation_id
        if not batch and (task_id is None or task_id not in self._sent):
            return  # forgotten, or for an earlier client that used this queue name
        try:
            content_type = properties.content_type or self.serializer.content_type
            if content_type == self.serializer.content_type:
                decoded = self.serializer.decode(message.body)
            else:
                decoded = serializer_for(content_type, _SAFE_CONTENT).decode(message.body)
            metas = (
                [TaskMeta.from_dict(state) for state in decoded] if batch else [TaskMeta.from_dict(decoded)]
            )
        except (SerializationError, TypeError, KeyError, ValueError) as exc:
            log.warning("Ignoring a reply that cannot be decoded (task %s): %s", task_id or "batch", exc)
            return
        for meta in metas:
            self._keep(meta)

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


def _settle(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for waiter in waiters:
        if not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
