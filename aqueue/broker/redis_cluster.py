"""redis+cluster:// — the Redis Streams layout of :mod:`aqueue.broker.redis` on a Redis Cluster.

Keys. Every key of one queue has the queue's name as its hash tag, so they share one hash slot and
the Lua scripts (which touch a queue's stream, delayed set and dead-letter stream together) run on
one node: ``P{<queue>}`` (the stream and its consumer group, so its claims), ``P{<queue>}.delayed``,
``P{<queue>}.dead``. Each queue thus lives on one node, and different queues spread over the nodes.
Rate-limit buckets and beat marks are one key each; pub/sub (broadcast, events, remote control) is the
cluster's, which reaches every node.

Delivery is the Redis broker's, except for the blocking read: a consumer of one queue blocks on the
node that serves it; a consumer of several queues (several slots, so no single ``XREADGROUP``) reads
them in turn, blocking at most 50 ms on each, so a message waits at most about 50 ms per other queue.
A read that meets ``MOVED`` (the slot moved to another node) reconnects to the new node.

Publishes and acks go as on one server (packed by hand, on a line: :class:`aqueue._redis.Line`), on
one line per node, to the node of each queue. A publish whose reply was lost is reported failed (there is no one-node marker to look at); the publisher's retry marks the
envelopes resent, so a worker runs a copy only when its task is neither running nor finished.

Celery's exchanges keep kombu's layout (:mod:`aqueue.broker.redis_exchange`), except that a reader
of a direct exchange (a remote-control client waiting for replies) pops one list, not one per priority
step, on the node that serves it, and its binding is two commands rather than one script (the binding
table and the deadlines are in different slots). Celery has no cluster transport, so no Celery
process shares these.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from aqueue._redis import Line, cluster_client, node_connection, seed_kwargs
from aqueue.broker.base import Consumer, Delivery
from aqueue.broker.exchange import Exchange
from aqueue.broker.redis import _LOST, GROUP, RedisBroker, _raise_first_error, _RedisConsumer
from aqueue.broker.redis_exchange import BINDING_TTL_MS, RedisExchanges
from aqueue.message import Envelope

__all__ = ["RedisClusterBroker"]

_MULTI_BLOCK = 0.05


class RedisClusterBroker(RedisBroker):
    """A broker keeping each queue in a Redis stream on a Redis Cluster (see the module docstring).

    Parameters and options are :class:`~aqueue.broker.redis.RedisBroker`'s; the URL is
    ``redis+cluster://[[user]:password@]host[:port]``, any node of the cluster.
    """

    schemes = ("redis+cluster",)

    def _open(self, url: str, options: dict[str, Any]) -> Any:
        self.db, self._lines = 0, dict[str, Line]()
        self._seed = seed_kwargs(url)
        return cluster_client(url, options, retry=Retry(NoBackoff(), 0))

    def stream_key(self, queue: str) -> str:
        return f"{self.prefix}{{{queue}}}"  # the hash tag: the other keys of the queue add a suffix

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        now, by_key = time.time(), dict[str, list[bytes]]()
        for e in envelopes:
            by_key.setdefault(self.stream_key(e.queue), []).append(self._publish_command(e, now))
        try:
            for key, commands in by_key.items():
                _raise_first_error(await self._line_for(key).send(b"".join(commands), len(commands)))
        except (RedisError, TimeoutError) as exc:  # a lost reply included: the publish failed
            raise self._failed("publish", exc) from exc

    def _line_for(self, key: str | bytes) -> Line:
        """The line (publishes and acks) to the node that serves ``key``'s slot."""
        cluster = cast(RedisCluster, self._client)
        node = cluster.get_node_from_key(key.decode() if isinstance(key, bytes) else key)
        name = node.name if node is not None else ""
        line = self._lines.get(name)
        if line is None:
            conn = node_connection(cluster, key if isinstance(key, str) else key.decode(), self.client_name)
            line = self._lines[name] = Line(conn, self.command_timeout)
        return line

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            for line in self._lines.values():
                await line.aclose()
            self._lines.clear()

    def _connection(self, name: str) -> AbstractConnection:
        """A connection to the seed node: pub/sub reaches every node from any of them."""
        return Connection(**dict(self._seed, client_name=name))

    def consume(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return _ClusterConsumer(self, queues, prefetch)

    @functools.cached_property
    def _exchanges(self) -> RedisExchanges:
        return _ClusterExchanges(self)


class _ClusterExchanges(RedisExchanges):
    def _reply_keys(self, queue: str) -> list[str]:
        return [self.broker.prefix + queue]

    async def _add_binding(self, exchange: Exchange, member: str) -> None:
        async with self.broker._client.pipeline(transaction=False) as pipe:
            pipe.sadd(self._table(exchange), member)
            pipe.zadd(self._deadlines(), {exchange.name: int(time.time() * 1000) + BINDING_TTL_MS}, gt=True)
            await pipe.execute()

    def _reader(self, key: str) -> Any:
        return node_connection(cast(RedisCluster, self.broker._client), key, self.broker.client_name)


class _ClusterConsumer(_RedisConsumer):
    def __init__(self, broker: RedisBroker, queues: Sequence[str], prefetch: int) -> None:
        super().__init__(broker, queues, prefetch)
        self._node_conns: dict[bytes, AbstractConnection] = {}
        self._turn = 0

    async def _read(self, n: int, block: float) -> list[Delivery]:
        if len(self.keys) == 1:
            return await self._read_one(self.keys[0], n, block)
        out: list[Delivery] = []
        self._turn = (self._turn + 1) % len(self.keys)
        for key in self.keys[self._turn :] + self.keys[: self._turn]:
            if len(out) >= n:
                break
            out += await self._read_one(key, n - len(out), None if out else min(block, _MULTI_BLOCK))
        return out

    async def _read_one(self, key: bytes, n: int, block: float | None) -> list[Delivery]:
        conn = self._node_conn(key)
        wait = () if block is None else ("BLOCK", max(1, int(block * 1000)))
        try:
            await conn.send_packed_command(
                conn.pack_command(
                    "XREADGROUP", "GROUP", GROUP, self.name, "COUNT", n, *wait, "STREAMS", key, ">"
                )
            )
            reply = await conn.read_response()
        except ResponseError as exc:
            if not str(exc).startswith(("MOVED", "ASK")):
                raise
            await self._forget(key)
            raise RedisConnectionError(f"the slot of {key.decode(errors='replace')} moved: {exc}") from exc
        except _LOST:
            await self._forget(key)
            raise
        if not reply:
            return []
        return self._deliveries(reply[0][0], reply[0][1], False)

    def _node_conn(self, key: bytes) -> AbstractConnection:
        conn = self._node_conns.get(key)
        if conn is None:
            conn = self._node_conns[key] = node_connection(self._cluster, key.decode(), self.name)
        return conn

    async def _forget(self, key: bytes) -> None:
        conn = self._node_conns.pop(key, None)
        if conn is not None:
            await conn.disconnect()
        with contextlib.suppress(RedisError, RedisClusterException, OSError):  # the next read retries
            await self._cluster.nodes_manager.initialize()

    async def _send_acks(self, ids: dict[bytes, list[bytes]]) -> list[Any]:
        broker, replies = cast(RedisClusterBroker, self.broker), list[Any]()
        for key, entry_ids in ids.items():  # one node per queue
            commands = self._ack_commands({key: entry_ids})
            replies += await broker._line_for(key).send(b"".join(commands), len(commands))
        return replies

    @property
    def _cluster(self) -> RedisCluster:
        return cast(RedisCluster, self.client)

    async def _shutdown(self) -> None:
        await super()._shutdown()
        for conn in self._node_conns.values():
            await conn.disconnect()
        self._node_conns.clear()
