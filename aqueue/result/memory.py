"""memory:// — results kept in this process; ``wait`` is woken when the result is stored."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from urllib.parse import urlsplit

from aqueue.exceptions import TimeoutError
from aqueue.result.base import ResultBackend, TaskMeta

__all__ = ["MemoryBackend"]


class _Chord:
    def __init__(self) -> None:
        self.parts: dict[int, bytes] = {}
        self.completed_by: int | None = None
        """The index of the part whose report completed the join."""


class _Store:
    def __init__(self) -> None:
        self.results: dict[str, bytes] = {}
        self.waiters: defaultdict[str, set[asyncio.Future[bytes]]] = defaultdict(set)
        self.chords: dict[str, _Chord] = {}


_STORES: defaultdict[str, _Store] = defaultdict(_Store)


class MemoryBackend(ResultBackend):
    """Results in this process's memory, shared by every ``memory://NAME`` backend of the same name."""

    def __init__(
        self, url: str = "memory://", serializer: str = "json", expires: float | None = None
    ) -> None:
        super().__init__(url, serializer, expires)
        self._shared = _STORES[urlsplit(url).netloc]

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        self._shared.results[task_id] = data
        if meta.ready and (waiters := self._shared.waiters.pop(task_id, None)):
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(data)

    async def _get(self, task_id: str) -> bytes | None:
        return self._shared.results.get(task_id)

    async def _delete(self, task_id: str) -> None:
        self._shared.results.pop(task_id, None)

    async def _chord_join(
        self, group_id: str, index: int, size: int, data: bytes, ttl: float
    ) -> tuple[bool, bool, int | None, list[bytes] | None]:
        # One event loop, no await in between: atomic. A sent chord is dropped (a late copy of a part then
        # starts a join that never completes, which is harmless).
        chord = self._shared.chords.setdefault(group_id, _Chord())
        chord.parts.setdefault(index, data)
        if len(chord.parts) < size:
            return False, False, None, None
        first = chord.completed_by is None
        if first:
            chord.completed_by = index
        return first, False, chord.completed_by, [chord.parts[i] for i in sorted(chord.parts)]

    async def _chord_sent(self, group_id: str) -> None:
        self._shared.chords.pop(group_id, None)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskMeta:
        meta = await self.get(task_id)
        if meta.ready:
            return meta
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        waiters = self._shared.waiters[task_id]
        waiters.add(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter, task_id)
        try:
            data = await waiter
        finally:
            waiters.discard(waiter)
            if not waiters and self._shared.waiters.get(task_id) is waiters:
                del self._shared.waiters[task_id]
            if timer is not None:
                timer.cancel()
        return TaskMeta.from_dict(self.serializer.decode(data))


def _expire(waiter: asyncio.Future[bytes], task_id: str) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"The operation timed out waiting for task {task_id}."))
