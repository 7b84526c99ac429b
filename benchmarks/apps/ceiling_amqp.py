"""The RabbitMQ reference: a minimal queue written straight on aio-pika, as issue 4 describes it.

Producer: persistent messages to a durable queue, one publisher confirm awaited per publish (so one
round trip per task). Worker: QoS prefetch = 4 x concurrency, one asyncio task per message, the result
published to the caller's reply queue (correlation id, as rpc:// does), then the message acked. Client:
one exclusive reply queue whose consumer resolves the futures of the waiting calls.

Worker: ``python ceiling_amqp.py`` (concurrency from BENCH_CONCURRENCY).
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from _env import AMQP_URL, CONCURRENCY, SLEEP

__all__ = ["Client", "serve"]

QUEUE = "ceil"


async def _noop() -> None:
    return None


async def _sleep50() -> None:
    await asyncio.sleep(SLEEP)


TASKS: dict[str, Callable[[], Awaitable[None]]] = {"noop": _noop, "sleep50": _sleep50}


async def serve() -> None:
    """Run the reference worker until SIGTERM."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=4 * CONCURRENCY)
    queue = await channel.declare_queue(QUEUE, durable=True)
    running: set[asyncio.Task[None]] = set()

    async def run(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        result = await TASKS[body["t"]]()
        reply = aio_pika.Message(json.dumps({"r": result}).encode(), correlation_id=message.correlation_id)
        await channel.default_exchange.publish(reply, routing_key=message.reply_to or "")
        await message.ack()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        task = asyncio.create_task(run(message))
        running.add(task)
        task.add_done_callback(running.discard)

    await queue.consume(on_message)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await connection.close()


class Client:
    """The producer side: ``send`` awaits the broker's confirm, then returns a future for the reply."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> None:
        self.connection = await aio_pika.connect(AMQP_URL)
        self.channel = await self.connection.channel()  # publisher confirms on
        await self.channel.declare_queue(QUEUE, durable=True)
        self.replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(json.loads(message.body)["r"])

    async def send(self, kind: str) -> asyncio.Future[Any]:
        task_id = uuid.uuid4().hex
        future = self.waiting[task_id] = asyncio.get_running_loop().create_future()
        message = aio_pika.Message(
            json.dumps({"id": task_id, "t": kind}).encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=task_id,
            reply_to=self.replies.name,
        )
        await self.channel.default_exchange.publish(message, routing_key=QUEUE)
        return future

    async def send_many(self, kind: str, n: int) -> list[asyncio.Future[Any]]:
        return [await self.send(kind) for _ in range(n)]

    async def stop(self) -> None:
        if self.connection is not None:
            await self.connection.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve())
