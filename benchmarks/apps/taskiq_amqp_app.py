"""taskiq on RabbitMQ (taskiq-aio-pika) with Redis results: ``taskiq worker taskiq_amqp_app:broker``."""

from __future__ import annotations

import asyncio

from _env import AMQP_URL, REDIS_URL, SLEEP
from taskiq_aio_pika import AioPikaBroker
from taskiq_redis import RedisAsyncResultBackend

broker = AioPikaBroker(url=AMQP_URL).with_result_backend(RedisAsyncResultBackend(redis_url=REDIS_URL))


@broker.task
async def noop() -> None:
    return None


@broker.task
async def sleep50() -> None:
    await asyncio.sleep(SLEEP)
