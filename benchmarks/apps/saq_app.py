"""SAQ: ``saq saq_app.settings``."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from _env import CONCURRENCY, POOL, REDIS_URL, SLEEP
from saq.queue.redis import RedisQueue

queue = RedisQueue(aioredis.from_url(REDIS_URL, max_connections=POOL))


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def sleep50(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(SLEEP)


settings = {"queue": queue, "functions": [noop, sleep50], "concurrency": CONCURRENCY}
