"""kombu's layout of Celery's exchanges on Redis, so Celery's tools and Flower read and write them.

With ``P`` the ``global_keyprefix`` and ``N`` the database number:

- fanout and topic exchanges are pub/sub. A message for exchange ``E`` with routing key ``K`` is
  published on the channel ``P/N.E/K`` (``P/N.E`` without a key); a reader bound with key ``B``
  subscribes to the pattern ``P/N.E/B`` with ``#`` read as ``*`` (``P/N.E`` for an empty key).
- direct exchanges (remote-control replies) route to lists. A reader adds its binding
  ``B\\x06\\x16\\x06\\x16Q`` to the set ``P_kombu.binding.E`` (and the table's deadline to
  ``P_kombu.binding_deadlines``, as kombu's binding refresh does) and pops the list ``PQ``; a sender
  pushes to the list of every queue bound with its routing key. The reader removes its binding and its
  list when it goes.
- a message is kombu's JSON envelope: ``body`` (base64), ``content-encoding``, ``content-type``,
  ``headers``, and ``properties`` (``delivery_mode``, ``delivery_info`` with the exchange and routing
  key, ``priority``, ``body_encoding``, ``delivery_tag``).
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pydantic_core

from aqueue._redis import pack
from aqueue.broker.exchange import Exchange, ExchangeMessage, Listener

if TYPE_CHECKING:
    from aqueue.broker.redis import RedisBroker

__all__ = ["BINDING_TTL_MS", "RedisExchanges", "envelope", "open_envelope"]

SEP = "\x06\x16"
"""kombu's separator of the parts of a binding."""
_PRIORITIES = ("", f"{SEP}3", f"{SEP}6", f"{SEP}9")
"""The suffixes of kombu's lists of one queue, one per priority step (0, 3, 6, 9)."""
BINDING_TTL_MS = 3_600_000
"""kombu's shortest life of a binding table nobody refreshes."""
_POP_BLOCK = 1
_REPLY_LIST_TTL_MS = 60_000


def envelope(exchange: Exchange, message: ExchangeMessage) -> bytes:
    """kombu's JSON envelope of ``message`` sent to ``exchange``."""
    return pydantic_core.to_json(
        {
            "body": base64.b64encode(message.body).decode(),
            "content-encoding": "utf-8",
            "content-type": message.content_type,
            "headers": message.headers,
            "properties": {
                "delivery_mode": message.delivery_mode,
                "delivery_info": {"exchange": exchange.name, "routing_key": message.routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def open_envelope(data: bytes) -> ExchangeMessage:
    """The message in a kombu envelope; what is not one comes back as a bare body, for its reader to refuse."""
    try:
        raw: dict[str, Any] = pydantic_core.from_json(data)
        properties = raw.get("properties") or {}
        body = raw.get("body") or ""
        encoded = base64.b64decode(body) if properties.get("body_encoding") == "base64" else body.encode()
        return ExchangeMessage(
            encoded,
            raw.get("headers") or {},
            str((properties.get("delivery_info") or {}).get("routing_key") or ""),
            str(raw.get("content-type") or ""),
            int(properties.get("delivery_mode") or 1),
        )
    except (ValueError, TypeError, AttributeError):
        return ExchangeMessage(data, content_type="")


class RedisExchanges:
    """Celery's exchanges on one :class:`~aqueue.broker.redis.RedisBroker`."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.fanout_prefix = f"{broker.prefix}/{broker.db}."

    def channel(self, exchange: Exchange, key: str) -> str:
        """The pub/sub channel (or, for a reader, the pattern) of ``exchange`` and ``key``."""
        return f"{self.fanout_prefix}{exchange.name}/{key}" if key else f"{self.fanout_prefix}{exchange.name}"

    async def send(self, exchange: Exchange, message: ExchangeMessage) -> None:
        broker, data = self.broker, envelope(exchange, message)
        async with broker._errors(f"send to exchange {exchange.name!r}"):
            if exchange.type != "direct":  # on the broker's line: events go out at the rate of tasks
                from aqueue.broker.redis import _raise_first_error

                command = pack(b"PUBLISH", self.channel(exchange, message.routing_key), data)
                _raise_first_error(await broker._line.send(command, 1))
                return
            bindings = await broker._client.smembers(self._table(exchange))
            queues = {q for rk, _, q in (_binding(b) for b in bindings) if rk == message.routing_key}
            async with broker._client.pipeline(transaction=False) as pipe:
                for queue in sorted(queues):
                    pipe.lpush(broker.prefix + queue, data)
                    pipe.pexpire(broker.prefix + queue, _REPLY_LIST_TTL_MS)  # its reader may have died
                await pipe.execute()

    @asynccontextmanager
    async def bind(
        self, exchange: Exchange, listener: Listener
    ) -> AsyncIterator[AsyncIterator[ExchangeMessage]]:
        if exchange.type != "direct":
            pattern = self.channel(exchange, listener.binding_key.replace("#", "*"))
            async with self.broker._listen(pattern, pattern=True) as inbox:
                yield _opened(inbox)
            return
        broker, member = self.broker, SEP.join([listener.binding_key, "", listener.queue])
        keys = self._reply_keys(listener.queue)
        async with broker._errors(f"bind a queue to exchange {exchange.name!r}"):
            await self._add_binding(exchange, member)
        conn = self._reader(keys[0])
        try:
            yield self._popped(conn, keys)
        finally:
            await conn.disconnect()
            async with (
                broker._errors(f"unbind a queue from exchange {exchange.name!r}"),
                broker._client.pipeline(transaction=False) as pipe,
            ):
                pipe.srem(self._table(exchange), member)
                pipe.srem(f"{broker.prefix}_kombu.binding_permanent.{exchange.name}", member)
                pipe.delete(*keys)
                await pipe.execute()

    async def _popped(self, conn: Any, keys: list[str]) -> AsyncIterator[ExchangeMessage]:
        from aqueue.broker.redis import _LOST, _Backoff

        backoff = _Backoff(f"reader of {keys[0]}", self.broker.url)
        while True:
            try:
                async with asyncio.timeout(self.broker.command_timeout + _POP_BLOCK):
                    await conn.send_command("BRPOP", *keys, _POP_BLOCK)
                    reply = await conn.read_response()
            except _LOST as exc:  # TimeoutError included
                await backoff.lost(conn, exc)
                continue
            backoff.ok()
            if reply:
                yield open_envelope(reply[1])

    def _table(self, exchange: Exchange) -> str:
        return f"{self.broker.prefix}_kombu.binding.{exchange.name}"

    def _deadlines(self) -> str:
        return f"{self.broker.prefix}_kombu.binding_deadlines"

    def _reply_keys(self, queue: str) -> list[str]:
        """The lists a reader of ``queue`` pops: kombu's one per priority step."""
        return [self.broker.prefix + queue + suffix for suffix in _PRIORITIES]

    async def _add_binding(self, exchange: Exchange, member: str) -> None:
        keys = [self._table(exchange), self._deadlines()]
        await self.broker._scripts["bind"](keys=keys, args=[member, exchange.name, BINDING_TTL_MS])

    def _reader(self, key: str) -> Any:
        """The connection a reader of ``key`` pops with."""
        return self.broker._connection(self.broker.client_name)


def _binding(member: bytes | str) -> list[str]:
    text = member.decode(errors="replace") if isinstance(member, bytes) else member
    parts = text.split(SEP)
    return parts if len(parts) == 3 else ["", "", ""]


async def _opened(inbox: AsyncIterator[bytes]) -> AsyncIterator[ExchangeMessage]:
    async for data in inbox:
        yield open_envelope(data)
