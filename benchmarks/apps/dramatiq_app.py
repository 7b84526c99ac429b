"""Dramatiq: ``dramatiq dramatiq_app --processes 1 --threads N``; async actors via its AsyncIO middleware,
or plain ones with BENCH_DRAMATIQ_SYNC=1.

BENCH_BROKER_URL picks the broker (redis:// or amqp://); results are always in Redis. With
BENCH_WORKFLOWS=1 the GroupCallbacks middleware is added too, for the group completion callbacks.
"""

from __future__ import annotations

import asyncio
import os
import time

import dramatiq
import redis
from _env import POOL, REDIS_URL, SLEEP
from dramatiq.middleware import GroupCallbacks
from dramatiq.middleware.asyncio import AsyncIO
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

_url = os.environ.get("BENCH_BROKER_URL", REDIS_URL)
if _url.startswith("amqp"):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: dramatiq.Broker = RabbitmqBroker(url=_url)
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(connection_pool=redis.ConnectionPool.from_url(_url, max_connections=POOL))
_results_pool = redis.ConnectionPool.from_url(REDIS_URL, max_connections=POOL)
broker.add_middleware(Results(backend=RedisBackend(connection_pool=_results_pool)))
if os.environ.get("BENCH_WORKFLOWS"):
    broker.add_middleware(
        GroupCallbacks(RateLimiterBackend(client=redis.Redis(connection_pool=_results_pool)))
    )
SYNC = bool(os.environ.get("BENCH_DRAMATIQ_SYNC"))
if not SYNC:
    broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


if SYNC:
    # Plain actors, Dramatiq's fastest way.

    @dramatiq.actor(store_results=True)
    def noop() -> None:
        return None

    @dramatiq.actor(store_results=True)
    def sleep50() -> None:
        time.sleep(SLEEP)

    # For the workflows: a pipeline of inc from 0; done is a group's completion callback.

    @dramatiq.actor(store_results=True)
    def inc(x: int) -> int:
        return x + 1

    @dramatiq.actor(store_results=True)
    def done() -> None:
        return None

else:

    @dramatiq.actor(store_results=True)
    async def noop() -> None:
        return None

    @dramatiq.actor(store_results=True)
    async def sleep50() -> None:
        await asyncio.sleep(SLEEP)

    @dramatiq.actor(store_results=True)
    async def inc(x: int) -> int:
        return x + 1

    @dramatiq.actor(store_results=True)
    async def done() -> None:
        return None
