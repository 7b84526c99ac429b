"""redis+cluster:// — task states as in :mod:`aqueue.result.redis`, on a Redis Cluster.

A state's key is Celery's, ``P celery-task-meta-<task id>``, so results spread over every slot and
node. Each store, read and delete is one command routed to the key's node by redis-py's cluster
client (the round trips are not coalesced as on one server: a batch of keys would span nodes). A
chord's two keys carry the group id as their hash tag (``P chord-parts-{<group id>}``,
``P chord-{<group id>}``) so its join script runs on one node. Waiters share one pub/sub connection,
to the seed node: PUBLISH on a cluster reaches every node.
"""

from __future__ import annotations

import asyncio
import builtins
from typing import Any

from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from aqueue._redis import cluster_client, seed_kwargs
from aqueue.exceptions import OperationalError
from aqueue.result.base import TaskMeta
from aqueue.result.redis import _STORE, RedisBackend, _Listener
from aqueue.urls import mask_password

__all__ = ["RedisClusterBackend"]


class RedisClusterBackend(RedisBackend):
    """Task states in a Redis Cluster; parameters are :class:`~aqueue.result.redis.RedisBackend`'s.

    Raises:
        InvalidURL: the URL is not ``redis+cluster://[[user]:password@]host[:port]``.
    """

    schemes = ("redis+cluster",)

    def _open(self, url: str, client_name: str, options: dict[str, Any]) -> None:
        self._cluster = cluster_client(url, {"client_name": client_name})
        self._listener = _Listener(Connection(**seed_kwargs(url, client_name=client_name)), url, self.timeout)

    async def connect(self) -> None:
        await self._call("connect", ("PING",))

    async def aclose(self) -> None:
        await self._listener.aclose()
        await self._cluster.aclose()

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        await self._call("store", ("EVAL", _STORE, 1, self.key(task_id), self.ttl_ms, self.format, data))

    async def _get(self, task_id: str) -> bytes | None:
        data: bytes | None = await self._call("get", ("GET", self.key(task_id)))
        return data

    async def _delete(self, task_id: str) -> None:
        await self._call("forget", ("DEL", self.key(task_id)))

    def _chord_keys(self, group_id: str) -> tuple[str, str]:
        return f"{self.prefix}chord-parts-{{{group_id}}}", f"{self.prefix}chord-{{{group_id}}}"

    async def _call(self, action: str, command: tuple[Any, ...]) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._cluster.execute_command(*command)
        except (RedisError, builtins.TimeoutError) as exc:
            url = mask_password(self.url)
            raise OperationalError(f"Redis result backend {url}: {action} failed: {exc}") from exc
