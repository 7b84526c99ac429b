"""The consumer of kombu's Redis lists: take in Lua, hold as kombu's QoS holds, renew, give back.

See :mod:`aqueue.broker.redis_kombu` for the layout and the protocol.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pydantic_core
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from aqueue._tasks import cancel_until_done
from aqueue.broker.base import Consumer, Delivery
from aqueue.broker.redis import _LOST, _STOP_TIMEOUT, _Backoff, _retrieved, _text, renew_forever
from aqueue.broker.redis_kombu import opened, redelivered
from aqueue.exceptions import OperationalError
from aqueue.urls import mask_password

if TYPE_CHECKING:
    from aqueue.broker.redis_kombu import KombuRedisBroker

__all__ = ["KombuConsumer"]

logger = logging.getLogger("aqueue.broker.redis")

_BLOCK = 1.0
"""Longest wait for a message (the waiting connections wake the consumer as soon as one arrives)."""
_MAX_WAITERS = 16
"""Lists waited on at once, each on a connection of its own; a list past these is looked at every 0.1 s."""
_POLL = 0.1
_CHUNK = 500


class KombuConsumer(Consumer):
    def __init__(self, broker: KombuRedisBroker, queues: Sequence[str], prefetch: int) -> None:
        super().__init__(queues, prefetch)
        self.broker, self.client = broker, broker._client
        host = re.sub(r"[^\w.-]", "_", socket.gethostname())
        self.name = f"aqueue-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._suffix = {q: f',"",{json.dumps(q)}]' for q in self.queues}
        """What follows the payload in kombu's unacked value: anonymous exchange, the queue as routing key."""
        self._held: dict[str, tuple[bytes, str]] = {}
        """Tag -> (payload, queue) of every message taken and not yet settled (renewed while here)."""
        self._waiting: list[tuple[float, int, Delivery]] = []
        """Taken messages whose eta is ahead, by eta."""
        self._order = itertools.count()
        self._failed_acks: set[str] = set()
        self._acks: tuple[list[str], asyncio.Future[None]] | None = None
        self._flushers: set[asyncio.Task[None]] = set()
        self._turn = 0
        self._fixed_order = tuple(sorted(self.queues)) if broker.queue_order == "sorted" else self.queues
        """The order of the queues when it does not turn (``queue_order_strategy`` priority or sorted)."""
        lists = [broker.list_key(q, step) for step in broker.priority_steps for q in self.queues]
        self._conns = {key: broker._connection(self.name) for key in lists[:_MAX_WAITERS]}
        """One connection per list waited on (BLMOVE blocks on one key), so any list wakes the consumer."""
        self._waiters: dict[str, asyncio.Task[None]] = {}
        self._backoff = _Backoff(f"consumer {self.name}", broker.url)
        self._renewer: asyncio.Task[None] | None = None
        self._next_restore = 0.0
        self._restore_every = min(5.0, max(0.05, broker.claim_timeout / 2))
        self._block = _BLOCK if len(lists) <= _MAX_WAITERS else _POLL

    async def _fetch(self, n: int) -> Sequence[Delivery]:
        try:
            async with asyncio.timeout(self.broker.command_timeout + _BLOCK):
                if self._renewer is None:
                    await self._start()
                if self._failed_acks:
                    await self._settle_acks(list(self._failed_acks))
                now = time.time()
                if time.monotonic() >= self._next_restore:
                    self._next_restore = time.monotonic() + self._restore_every
                    await self.broker.restore_stale(self._held)
                out = self._due(n, now)
                if len(out) < n:
                    try:
                        out += await self._take(n - len(out), now)
                    except BaseException:  # cancelled too: the due ones wait for the next fetch
                        self._keep(out, now)
                        raise
                if not out:
                    await self._wait()
        except _LOST as exc:  # TimeoutError included
            await self._backoff.lost(next(iter(self._conns.values())), exc)
            return []
        except RedisError as exc:
            if "WRONGTYPE" in str(exc):
                raise OperationalError(
                    f"Redis broker {mask_password(self.broker.url)}: a key of the queues {list(self.queues)} "
                    "is not a list, as kombu's layout keeps them: is this database (or global_keyprefix) "
                    "used by aqueue's Streams layout too? Give each layout its own."
                ) from exc
            raise self._error("fetch", exc) from exc
        self._backoff.ok()
        return out

    async def _start(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                for key, member in self.broker.bindings(queue):
                    pipe.sadd(key, member)
            await pipe.execute()
        self.broker._kombu_consumers.add(self)
        self._renewer = asyncio.create_task(self._renew_forever())

    def _due(self, n: int, now: float) -> list[Delivery]:
        out: list[Delivery] = []
        while self._waiting and len(out) < n and self._waiting[0][0] <= now:
            out.append(heapq.heappop(self._waiting)[2])
        return out

    async def _take(self, n: int, now: float) -> list[Delivery]:
        broker, queues = self.broker, self.queues
        if broker.queue_order == "round_robin":  # each queue first in turn, kombu's default
            order = queues[self._turn :] + queues[: self._turn]
            self._turn = (self._turn + 1) % len(queues)
        else:
            order = self._fixed_order
        lists = [(broker.list_key(q, step), q) for step in broker.priority_steps for q in order]
        keys = [key for key, _ in lists] + [broker.dead_key(q) for _, q in lists]
        keys += [broker.unacked_key, broker.index_key, broker.claims_key]
        args: list[Any] = [n, repr(now), len(lists), *(self._suffix[q] for _, q in lists)]
        reply = await broker._kombu_scripts["take"](keys=keys, args=args)
        out: list[Delivery] = []
        unreadable: list[str] = []
        for i in range(0, len(reply), 3):
            queue, item, tag = lists[int(reply[i]) - 1][1], reply[i + 1], reply[i + 2].decode()
            if not tag:  # the script dead-lettered it
                _unreadable(queue, item, "no delivery tag")
                continue
            self._held[tag] = (item, queue)
            delivery = self._delivery(queue, item, tag)
            if delivery is None:
                unreadable.append(tag)
                continue
            eta = _eta(delivery.headers)
            if eta is not None and eta > now:
                heapq.heappush(self._waiting, (eta, next(self._order), delivery))
            else:
                out.append(delivery)
        if unreadable:
            try:
                await self._reject_unreadable(unreadable)
            except BaseException:  # cancelled: what was taken waits for the next fetch
                self._keep(out, now)
                raise
        return out

    def _keep(self, deliveries: list[Delivery], now: float) -> None:
        """Keep taken deliveries a fetch could not return, for the next fetch to hand out."""
        for delivery in deliveries:
            heapq.heappush(self._waiting, (now, next(self._order), delivery))

    async def _reject_unreadable(self, tags: list[str]) -> None:
        for tag in tags:
            item, queue = self._held[tag]
            try:
                await self._give_back(tag, self.broker.dead_key(queue), item, "LPUSH")
            except RedisError as exc:
                # No longer renewed: given back to its list once its claim runs out, and read again.
                logger.debug("Dead-lettering an unreadable message failed: %s", exc)
                continue
            _unreadable(queue, item, "not a kombu envelope with a body and a content type")

    def _delivery(self, queue: str, item: bytes, tag: str) -> Delivery | None:
        envelope, again = opened(queue, item)
        if not envelope.content_type:
            return None
        properties = {"reply_to": envelope.reply_to, "priority": envelope.priority}
        return Delivery(
            self,
            envelope.id,
            queue,
            envelope.body,
            envelope.content_type,
            again,
            tag,
            envelope.headers,
            properties,
        )

    async def _wait(self) -> None:
        """Wait until a list may have a message, the next eta is due, or it is time to give back stale ones."""
        now, block = time.time(), self._block
        if self._waiting:
            block = min(block, self._waiting[0][0] - now)
        block = max(0.01, min(block, self._next_restore - time.monotonic()))
        for key, conn in self._conns.items():
            if key not in self._waiters:
                self._waiters[key] = asyncio.create_task(_wait_on(conn, key))
        await asyncio.wait(self._waiters.values(), timeout=block, return_when=asyncio.FIRST_COMPLETED)
        failed: BaseException | None = None
        for key, waiter in list(self._waiters.items()):
            if waiter.done():
                del self._waiters[key]
                if waiter.exception() is not None:
                    await self._conns[key].disconnect()
                    failed = waiter.exception()
        if failed is not None:
            raise failed

    async def _renew_forever(self) -> None:
        broker = self.broker
        every = min(broker.claim_timeout, broker.visibility_timeout) / 3  # either may give a message back
        await renew_forever(self.name, every, broker.command_timeout, self._renew)

    async def _renew(self) -> None:
        tags, now = list(self._held), time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            for i in range(0, len(tags), _CHUNK):
                scores = dict.fromkeys(tags[i : i + _CHUNK], now)
                pipe.zadd(self.broker.claims_key, scores, xx=True)
                pipe.zadd(self.broker.index_key, scores, xx=True)
            if len(pipe):
                await pipe.execute()

    async def _ack(self, delivery: Delivery) -> None:
        # The acks of one loop turn go out in one pipeline.
        if self._acks is None:
            self._acks = ([], asyncio.get_running_loop().create_future())
            flusher = asyncio.create_task(self._flush_acks())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        tags, done = self._acks
        tags.append(delivery.tag)
        await asyncio.shield(done)

    async def _flush_acks(self) -> None:
        await asyncio.sleep(0)
        assert self._acks is not None
        (tags, done), self._acks = self._acks, None
        try:
            async with asyncio.timeout(self.broker.command_timeout):
                await self._settle_acks(tags)
        except (RedisError, TimeoutError) as exc:
            # Still held and renewed: the acks are sent again before the next fetch.
            self._failed_acks.update(tags)
            done.set_exception(self._error("ack", exc))
            done.add_done_callback(_retrieved)
        else:
            done.set_result(None)

    async def _settle_acks(self, tags: list[str]) -> None:
        broker = self.broker
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hdel(broker.unacked_key, *tags)
            pipe.zrem(broker.index_key, *tags)
            pipe.zrem(broker.claims_key, *tags)
            await pipe.execute()
        for tag in tags:
            self._held.pop(tag, None)
            self._failed_acks.discard(tag)

    async def _reject(self, delivery: Delivery) -> None:
        item, queue = self._held[delivery.tag]
        await self._settling(delivery.tag, self.broker.dead_key(queue), item, "LPUSH")

    async def _requeue(self, delivery: Delivery) -> None:
        item, queue = self._held[delivery.tag]
        again = pydantic_core.to_json(redelivered(pydantic_core.from_json(item)))
        priority = (delivery.properties or {}).get("priority")
        target = self.broker.list_key(queue, priority if type(priority) is int else None)
        await self._settling(delivery.tag, target, again, "RPUSH")

    async def _settling(self, tag: str, target: str, payload: bytes, push: str) -> None:
        try:
            async with asyncio.timeout(self.broker.command_timeout):
                await self._give_back(tag, target, payload, push)
        except (RedisError, TimeoutError) as exc:
            # No longer renewed: once its claim runs out, any consumer gives it back to its list.
            self._held.pop(tag, None)
            raise self._error("settle", exc) from exc

    async def _give_back(self, tag: str, target: str, payload: bytes, push: str) -> None:
        """Move a held message to ``target`` (its list, or its dead-letter list), unless settled since."""
        broker = self.broker
        item, queue = self._held.pop(tag)  # whatever the outcome: a give-back that failed is never renewed
        value = b"[" + item + self._suffix[queue].encode()
        keys = [broker.unacked_key, broker.index_key, broker.claims_key, target]
        await broker._kombu_scripts["restore"](keys=keys, args=[tag, value, payload, push])

    async def aclose(self) -> None:
        """Stop consuming: give back what was taken and not handed out, those waiting for their eta too."""
        try:
            await super().aclose()
            while self._waiting:
                await heapq.heappop(self._waiting)[2].requeue()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.broker._kombu_consumers.discard(self)
        if self._flushers:
            await asyncio.wait(self._flushers, timeout=self.broker.command_timeout)
        # Cancelled until they stop (redis-py can lose one cancellation), without swallowing our own.
        parts = [*self._waiters.values(), *([self._renewer] if self._renewer is not None else [])]
        self._renewer = None
        self._waiters.clear()
        if await cancel_until_done(parts, _STOP_TIMEOUT):
            logger.warning("Redis kombu layout: parts of consumer %s did not stop", self.name)
        for conn in self._conns.values():
            await conn.disconnect()

    def _error(self, action: str, exc: BaseException) -> OperationalError:
        url = mask_password(self.broker.url)
        return OperationalError(f"Redis broker {url}: {action} failed for consumer {self.name}: {_text(exc)}")


async def _wait_on(conn: AbstractConnection, key: str) -> None:
    """Return once ``key`` has a message, or after a second: BLMOVE of a list onto its own tail takes nothing."""
    await conn.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", _BLOCK)
    await conn.read_response()


def _unreadable(queue: str, item: bytes, why: str) -> None:
    logger.error(
        "Rejecting unreadable message of queue %r: %s (%r). It was not run and has been dead-lettered.",
        queue, why, item[:200],
    )  # fmt: skip


def _eta(headers: dict[str, Any] | None) -> float | None:
    """The eta header of Celery's message as a unix time; None when absent or unreadable (the codec says)."""
    value = headers.get("eta") if headers else None
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
