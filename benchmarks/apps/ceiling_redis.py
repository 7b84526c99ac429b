"""The Redis ceiling: a minimal queue written straight on redis-py, doing the Redis work a queue must do.

Producer: XADD, pipelined when many are sent. Worker: XREADGROUP in batches sized by the free room in a prefetch window of 4 x concurrency, one
asyncio task per message, then per loop turn one pipeline with XACK + XDEL of the finished entries and
SET result + PUBLISH for each. Client: one pub/sub connection resolving the futures of the waiting calls.
No retries, no routing, no serialization beyond JSON of a tiny dict: the cost of the Redis round trips
and of the asyncio plumbing, nothing else.

Worker: ``python ceiling_redis.py`` (concurrency from BENCH_CONCURRENCY).
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from _env import CONCURRENCY, REDIS_URL, SLEEP

__all__ = ["Client", "serve"]

STREAM, GROUP, CHANNEL = "ceil:q", "ceil:g", "ceil:results"
RESULT_TTL = 3600


async def _noop() -> None:
    return None


async def _sleep50() -> None:
    await asyncio.sleep(SLEEP)


TASKS: dict[str, Callable[[], Awaitable[None]]] = {"noop": _noop, "sleep50": _sleep50}


class _Worker:
    def __init__(self, r: aioredis.Redis, concurrency: int) -> None:
        self.r = r
        # Entries held at once (running or waiting for a slot), as a prefetch window of 4 x concurrency.
        self.free = 4 * concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.running: set[asyncio.Task[None]] = set()
        self.finished: list[tuple[bytes, str, Any]] = []
        self.flushing: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()

    async def run(self) -> None:
        try:
            await self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError:
            pass  # the group exists
        while True:
            while self.free == 0:
                self.wake.clear()
                await self.wake.wait()
            reply = await self.r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=self.free, block=1000)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    self.free -= 1
                    task = asyncio.create_task(self._run(entry_id, fields))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)

    async def _run(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        body = json.loads(fields[b"m"])
        async with self.slots:
            result = await TASKS[body["t"]]()
        self.finished.append((entry_id, body["id"], result))
        if self.flushing is None:
            self.flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the tasks finishing in this loop turn join the batch
        while self.finished:
            batch, self.finished = self.finished, []
            ids = [entry_id for entry_id, _, _ in batch]
            pipe = self.r.pipeline(transaction=False)
            pipe.xack(STREAM, GROUP, *ids)
            pipe.xdel(STREAM, *ids)
            for _, task_id, result in batch:
                payload = json.dumps({"id": task_id, "r": result})
                pipe.set(f"ceil:r:{task_id}", payload, ex=RESULT_TTL)
                pipe.publish(CHANNEL, payload)
            await pipe.execute()
            self.free += len(batch)
            self.wake.set()
        self.flushing = None


async def serve() -> None:
    """Run the ceiling worker until SIGTERM."""
    r = aioredis.Redis.from_url(REDIS_URL)
    worker = asyncio.create_task(_Worker(r, CONCURRENCY).run())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    worker.cancel()
    await r.aclose()


class Client:
    """The producer side: ``send`` / ``send_many`` return futures completed by the result channel."""

    def __init__(self) -> None:
        self.r = aioredis.Redis.from_url(REDIS_URL)
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.r.pubsub()
        await pubsub.subscribe(CHANNEL)
        self.reader = asyncio.create_task(self._read(pubsub))

    async def _read(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            body = json.loads(message["data"])
            future = self.waiting.pop(body["id"], None)
            if future is not None and not future.done():
                future.set_result(body["r"])

    def _prepare(self, kind: str) -> tuple[asyncio.Future[Any], str]:
        task_id = uuid.uuid4().hex
        future = self.waiting[task_id] = asyncio.get_running_loop().create_future()
        return future, json.dumps({"id": task_id, "t": kind})

    async def send(self, kind: str) -> asyncio.Future[Any]:
        future, body = self._prepare(kind)
        await self.r.xadd(STREAM, {"m": body})
        return future

    async def send_many(self, kind: str, n: int) -> list[asyncio.Future[Any]]:
        prepared = [self._prepare(kind) for _ in range(n)]
        pipe = self.r.pipeline(transaction=False)
        for _, body in prepared:
            pipe.xadd(STREAM, {"m": body})
        await pipe.execute()
        return [future for future, _ in prepared]

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.r.aclose()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve())
