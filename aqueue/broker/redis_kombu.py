"""redis:// with ``broker_transport_options={"layout": "kombu"}`` — kombu's lists, shared with Celery.

This is the layout Celery's Redis transport (kombu's) uses, so Celery 5 clients and workers and aqueue
clients and workers share queues. Keys, with ``P`` the ``global_keyprefix`` (kombu's option of the same
name, which Celery's side must set alike) and ``S`` kombu's separator ``\\x06\\x16``:

- ``P<queue>``, ``P<queue>S3``, ``P<queue>S6``, ``P<queue>S9``: the queue's lists, one per step of
  ``priority_steps`` (``[0, 3, 6, 9]``; a priority goes to the highest step not above it). A message
  is ``LPUSH``-ed and taken from the other end, and the lists are taken in step order: on Redis, as in
  Celery, **a lower priority number runs first** (0 before 9, the reverse of RabbitMQ's).
- a message is kombu's JSON envelope: ``body`` (base64), ``content-encoding``, ``content-type``,
  ``headers`` (Celery's task headers: :mod:`aqueue.protocol`), ``properties`` (``correlation_id``,
  ``reply_to``, ``delivery_mode``, ``delivery_info`` with ``exchange`` and ``routing_key``,
  ``priority``, ``body_encoding``, ``delivery_tag``, and ``expiration`` when the task expires).
- ``Punacked`` (hash: delivery tag -> ``[payload, exchange, routing key]``) and ``Punacked_index``
  (sorted set: tag -> when it was taken): the messages consumers hold unacknowledged, as kombu's QoS
  keeps them. Celery's workers give back to its queue a message held longer than their
  ``visibility_timeout`` (an hour by default), and so does aqueue (the option of the same name).
- ``Paqueue.unacked_claims`` (sorted set: tag -> last renewal): the tags aqueue consumers hold. A live
  consumer renews its claims, and their scores in ``unacked_index``, every ``claim_timeout / 3``;
  another aqueue consumer gives back a message whose claim is older than ``claim_timeout`` (30 s), so
  a killed aqueue worker's messages run again within about that, while a long task is never given
  back while its worker lives (neither by aqueue nor by Celery's workers).
- ``P_kombu.binding.<queue>`` (and ``P_kombu.binding_permanent.<queue>``): the binding of the queue
  to the exchange of its name, as a Celery client declares it.
- ``P<queue>.dead``: aqueue's dead letters (a list of envelopes, oldest last; kombu has none). A message
  aqueue gave back ``max_deliveries - 1`` times (counted in its property ``x-aqueue-restores``) goes there
  the next time its holder vanishes.
- Celery's exchanges (monitoring events, remote control) as :mod:`aqueue.broker.redis_exchange` says.

Taking is one Lua script: up to ``n`` messages popped from the lists in order and recorded in
``unacked``, ``unacked_index`` and the claims at once, so a message is never popped without being held
(kombu's ``BRPOP`` then ``HSET`` loses one whose reply is lost). When there is nothing to take, the
consumer waits with ``BLMOVE`` of each list onto itself (which leaves the list as it is), one
connection per list (up to 16; past those, it looks every 0.1 s), and takes as soon as one answers. A
message whose ``eta`` is ahead stays held (and renewed) by the
consumer that took it and is handed out when due, as a Celery worker does; a graceful shutdown gives it
back. ack removes the tag from the three; requeue and a give-back push the message back to the front
of its list, marked ``redelivered`` as kombu marks it (``headers`` and ``delivery_info``); reject
moves it to the dead-letter list. A message that is not a kombu envelope with a delivery tag is
dead-lettered as it is, and logged.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from bisect import bisect
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue._redis import pack
from aqueue.broker.base import Consumer
from aqueue.broker.redis import RedisBroker, _check_positive
from aqueue.broker.redis_exchange import SEP
from aqueue.exceptions import ImproperlyConfigured
from aqueue.ids import new_id
from aqueue.message import Envelope
from aqueue.protocol import CELERY

if TYPE_CHECKING:
    from aqueue.broker.redis_kombu_consumer import KombuConsumer

__all__ = ["KombuRedisBroker", "kombu_envelope"]

logger = logging.getLogger("aqueue.broker.redis")

PRIORITY_STEPS = (0, 3, 6, 9)
RESTORES = "x-aqueue-restores"
"""The property counting how often aqueue gave a message back after its holder vanished (kombu keeps no count)."""
_LUA = {name: (Path(__file__).parent / f"redis_kombu_{name}.lua").read_text() for name in ("take", "restore")}
_KOMBU_ONLY = (
    "unacked_mutex_key", "unacked_mutex_expire", "unacked_restore_limit", "unacked_restore_interval",
    "unacked_restore_throttle", "socket_keepalive_options", "retry_on_timeout",
)  # fmt: skip
"""kombu's options of how its own restore sweeps and connections work: accepted, and ignored here."""
_ENCODINGS = {"application/json": "utf-8"}
"""kombu's content-encoding of each content type; every other one is ``binary``."""


def kombu_envelope(envelope: Envelope, now: float) -> dict[str, Any]:
    """kombu's JSON envelope of ``envelope`` as a Celery client publishes it to its queue."""
    headers = dict(envelope.headers or {})
    if envelope.eta is not None and "eta" not in headers:
        headers["eta"] = datetime.fromtimestamp(envelope.eta, UTC).isoformat()
    properties: dict[str, Any] = {"correlation_id": envelope.id}
    if envelope.reply_to is not None:
        properties["reply_to"] = envelope.reply_to
    properties["delivery_mode"] = 2
    expires = headers.get("expires")
    if isinstance(expires, str):
        with contextlib.suppress(ValueError, OverflowError, OSError):
            left = datetime.fromisoformat(expires).timestamp() - now
            properties["expiration"] = str(int(max(0.0, left) * 1000))
    properties["delivery_info"] = {"exchange": "", "routing_key": envelope.queue}
    properties["priority"] = envelope.priority or 0
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = new_id()
    if envelope.resent:
        headers["redelivered"] = True
        properties["delivery_info"]["redelivered"] = True
    return {
        "body": base64.b64encode(envelope.body).decode(),
        "content-encoding": _ENCODINGS.get(envelope.content_type, "binary"),
        "content-type": envelope.content_type,
        "headers": headers,
        "properties": properties,
    }


QUEUE_ORDERS = ("round_robin", "priority", "sorted")
"""kombu's ways of choosing which queue a worker takes from first (``queue_order_strategy``)."""


class KombuRedisBroker(RedisBroker):
    """A broker keeping each queue in kombu's Redis lists (see the module docstring).

    Parameters:
        url: ``redis://[[user]:password@]host[:port][/db]``, or ``rediss://`` for TLS.
        visibility_timeout: kombu's: seconds after which any held message is given back (default 3600,
            as kombu's; set it as the Celery workers on the same Redis do).
        claim_timeout: seconds after which a message an aqueue consumer stopped renewing is given back.
        max_deliveries: a message taken this many times and never settled (its holders vanished) is
            dead-lettered instead of given back again (default 10).
        priority_steps: kombu's priority lists (default ``[0, 3, 6, 9]``; Celery's side must agree).
        unacked_key, unacked_index_key: kombu's names of the held messages' hash and sorted set.
        options: ``global_keyprefix``, ``max_connections`` and the connection options of
            :class:`~aqueue.broker.redis.RedisBroker`; kombu's ``unacked_mutex_*``, ``unacked_restore_*``,
            ``socket_keepalive_options`` and ``retry_on_timeout`` are accepted and ignored (aqueue gives
            messages back in atomic scripts, without kombu's mutex); ``sep`` and ``ack_emulation`` only
            with kombu's defaults; ``queue_order_strategy`` as kombu's: which of a worker's queues is
            taken from first (``round_robin``, the default: each in turn; ``priority``: in the order the
            worker names them; ``sorted``: by name).

    Raises:
        InvalidURL: the URL is not a usable redis URL.
        ImproperlyConfigured: an unknown option (naming the closest known one) or a bad value.
    """

    codec = CELERY

    def __init__(
        self,
        url: str,
        *,
        visibility_timeout: float = 3600.0,
        claim_timeout: float = 30.0,
        priority_steps: Sequence[int] = PRIORITY_STEPS,
        unacked_key: str = "unacked",
        unacked_index_key: str = "unacked_index",
        **options: Any,
    ) -> None:
        _check_positive(claim_timeout=claim_timeout)
        steps = tuple(priority_steps)
        if (
            not steps
            or steps[0] != 0
            or any(not isinstance(s, int) for s in steps)
            or list(steps) != sorted(steps)
        ):
            raise ImproperlyConfigured(
                f"priority_steps must be increasing integers starting at 0, as kombu's, not {priority_steps!r}."
            )
        for name in _KOMBU_ONLY:
            options.pop(name, None)
        if options.get("sep", SEP) != SEP or options.pop("ack_emulation", True) is not True:
            raise ImproperlyConfigured(
                "kombu's layout is shared with Celery only with kombu's defaults of sep ('\\x06\\x16') "
                "and ack_emulation (True)."
            )
        strategy = options.pop("queue_order_strategy", "round_robin")
        if strategy not in QUEUE_ORDERS:
            raise ImproperlyConfigured(
                f"Unknown queue_order_strategy {strategy!r}: use one of {', '.join(map(repr, QUEUE_ORDERS))}."
            )
        super().__init__(url, visibility_timeout=visibility_timeout, **options)
        self.claim_timeout, self.priority_steps = float(claim_timeout), steps
        self.queue_order: str = strategy
        """kombu's ``queue_order_strategy``: ``round_robin``, ``priority`` or ``sorted``."""
        p = self.prefix
        self.unacked_key, self.index_key = p + unacked_key, p + unacked_index_key
        self.claims_key = f"{p}aqueue.unacked_claims"
        self._kombu_scripts = {name: self._client.register_script(source) for name, source in _LUA.items()}
        self._bound: set[str] = set()
        self._kombu_consumers: set[KombuConsumer] = set()
        self._unrestorable: set[str] = set()

    def list_key(self, queue: str, priority: int | None = 0) -> str:
        """The key of ``queue``'s list for ``priority`` (kombu's ``_q_for_pri``)."""
        steps = self.priority_steps
        step = steps[bisect(steps, max(0, min(int(priority or 0), 9))) - 1]
        return f"{self.prefix}{queue}{SEP}{step}" if step else f"{self.prefix}{queue}"

    def list_keys(self, queue: str) -> list[str]:
        """Every list of ``queue``, highest step (first taken) first."""
        return [self.list_key(queue, step) for step in self.priority_steps]

    async def aclose(self) -> None:
        for consumer in list(self._kombu_consumers):
            await consumer._shutdown()
        await super().aclose()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        now = time.time()
        unbound = {e.queue for e in envelopes} - self._bound
        commands = [pack(b"SADD", key, member) for queue in unbound for key, member in self.bindings(queue)]
        for e in envelopes:
            envelope = pydantic_core.to_json(kombu_envelope(e, now))
            commands.append(pack(b"LPUSH", self.list_key(e.queue, e.priority), envelope))
        await self._send_marked(commands, len(envelopes))
        self._bound.update(e.queue for e in envelopes)

    def bindings(self, queue: str) -> list[tuple[str, str]]:
        """The (set, member) pairs that bind ``queue`` to the direct exchange of its name, as a Celery
        client's declaration does."""
        member = SEP.join([queue, "", queue])
        return [
            (f"{self.prefix}{kind}{queue}", member)
            for kind in ("_kombu.binding.", "_kombu.binding_permanent.")
        ]

    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        from aqueue.broker.redis_kombu_consumer import KombuConsumer

        return KombuConsumer(self, queues, prefetch)

    async def purge(self, queue: str) -> int:
        async with self._errors("purge"), self._client.pipeline(transaction=True) as pipe:
            for key in self.list_keys(queue):
                pipe.llen(key)
                pipe.delete(key)
            replies = await pipe.execute()
        return sum(int(n) for n in replies[::2])

    async def dead_letters(self, queue: str) -> list[Envelope]:
        """The envelopes in ``queue``'s dead-letter list, oldest first."""
        async with self._errors("read dead letters"):
            items = await self._client.lrange(self.dead_key(queue), 0, -1)
        return [opened(queue, _bytes(item))[0] for item in reversed(items or [])]

    async def restore_stale(self, held: Mapping[str, object]) -> int:
        """Give back the messages held past their claim or visibility timeout (not those in ``held``).

        Returns how many were given back.
        """
        now, client = time.time(), self._client
        tags: list[Any] = []
        for key, timeout in (
            (self.claims_key, self.claim_timeout),
            (self.index_key, self.visibility_timeout),
        ):
            tags += await client.zrangebyscore(key, "-inf", now - timeout, start=0, num=100)
        restored = 0
        for raw_tag in dict.fromkeys(tags):
            tag = _bytes(raw_tag).decode(errors="replace")
            if tag not in held:
                restored += await self._restore_one(tag)
        return restored

    async def _restore_one(self, tag: str) -> int:
        client = self._client
        value = await client.hget(self.unacked_key, tag)
        if value is None:  # settled or restored meanwhile: only its scores were left
            async with client.pipeline(transaction=False) as pipe:
                pipe.zrem(self.index_key, tag)
                pipe.zrem(self.claims_key, tag)
                await pipe.execute()
            return 0
        try:
            payload, exchange, routing_key = pydantic_core.from_json(value)
            queue = await self._destination(str(exchange or ""), str(routing_key or ""))
            properties = payload["properties"]
            priority, restores = properties.get("priority"), _int(properties.get(RESTORES)) or 0
            properties[RESTORES] = restores + 1
            again = pydantic_core.to_json(redelivered(payload))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            if tag not in self._unrestorable:
                self._unrestorable.add(tag)
                logger.error(
                    "Cannot give back the held message %s (%s): left in %s", tag, exc, self.unacked_key
                )
            return 0
        if queue is None:
            return 0
        if restores + 1 >= self.max_deliveries:  # taken that many times, and never settled
            keys = [self.unacked_key, self.index_key, self.claims_key, self.dead_key(queue)]
            if await self._kombu_scripts["restore"](keys=keys, args=[tag, value, again, "LPUSH"]):
                logger.error(
                    "Message %s of queue %r was taken %d times and never settled: dead-lettered",
                    tag, queue, restores + 1,
                )  # fmt: skip
            return 0
        keys = [self.unacked_key, self.index_key, self.claims_key, self.list_key(queue, _int(priority))]
        return int(await self._kombu_scripts["restore"](keys=keys, args=[tag, value, again, "RPUSH"]))

    async def _destination(self, exchange: str, routing_key: str) -> str | None:
        """The queue a held message goes back to: kombu's lookup of a direct exchange's binding."""
        if not exchange:
            return routing_key
        bindings = await self._client.smembers(f"{self.prefix}_kombu.binding.{exchange}")
        for member in sorted(bindings):
            parts = _bytes(member).decode(errors="replace").split(SEP)
            if len(parts) == 3 and parts[0] == routing_key:
                return parts[2]
        if exchange not in self._unrestorable:
            self._unrestorable.add(exchange)
            logger.error(
                "Cannot give back messages held from exchange %r: no queue is bound to it with routing key %r",
                exchange, routing_key,
            )  # fmt: skip
        return None


def redelivered(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` marked redelivered, as kombu marks a message it gives back, under a new delivery tag.

    (kombu keeps the tag; a new one means a late ack of the old holder cannot remove the new one's hold.)
    """
    headers, properties = payload.get("headers"), payload.get("properties")
    if isinstance(headers, dict):
        headers["redelivered"] = True
    if isinstance(properties, dict):
        if isinstance(properties.get("delivery_info"), dict):
            properties["delivery_info"]["redelivered"] = True
        properties["delivery_tag"] = new_id()
    return payload


def opened(queue: str, item: bytes) -> tuple[Envelope, bool]:
    """The envelope in kombu's JSON ``item`` and whether it was redelivered; nothing here raises.

    What cannot be read comes back as an envelope with the raw item as its body and no content type.
    """
    try:
        payload = pydantic_core.from_json(item)
        properties = payload.get("properties") or {}
        headers = payload.get("headers")
        headers = dict(headers) if isinstance(headers, dict) else {}
        again = bool(headers.pop("redelivered", False)) or bool(
            (properties.get("delivery_info") or {}).get("redelivered")
        )
        body = payload["body"]
        data = (
            base64.b64decode(body, validate=True)
            if properties.get("body_encoding") == "base64"
            else body.encode()
        )
        task_id = headers.get("id") or properties.get("correlation_id") or properties.get("delivery_tag")
        content_type = payload["content-type"]
        if not isinstance(task_id, str) or not isinstance(content_type, str):
            raise TypeError("no id or content type")
        priority = _int(properties.get("priority"))
        envelope = Envelope(
            task_id,
            queue,
            data,
            content_type,
            None,
            priority,
            headers,
            reply_to=_str(properties.get("reply_to")),
        )
        return envelope, again
    except (ValueError, TypeError, AttributeError, KeyError):
        return Envelope("", queue, item, ""), False


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
