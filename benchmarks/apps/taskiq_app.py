"""taskiq on Redis Streams (taskiq-redis's README setup): ``taskiq worker taskiq_app:broker``."""

from __future__ import annotations

import asyncio

from _env import REDIS_URL, SLEEP
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

broker = RedisStreamBroker(url=REDIS_URL).with_result_backend(RedisAsyncResultBackend(redis_url=REDIS_URL))


@broker.task
async def noop() -> None:
    return None


@broker.task
async def sleep50() -> None:
    await asyncio.sleep(SLEEP)
