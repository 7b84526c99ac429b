"""streaq: ``streaq run streaq_app:worker``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from _env import CONCURRENCY, POOL, REDIS_URL, SLEEP
from streaq import Worker


@asynccontextmanager
async def quiet() -> AsyncIterator[None]:
    # streaq's CLI logs two INFO lines per task and has no option to lower it; every other worker here
    # runs at WARNING, so this does the same once the CLI has configured logging.
    logging.getLogger("streaq").setLevel(logging.WARNING)
    yield


worker = Worker(
    redis_url=REDIS_URL, concurrency=CONCURRENCY, lifespan=quiet, redis_kwargs={"max_connections": POOL}
)


@worker.task
async def noop() -> None:
    return None


@worker.task
async def sleep50() -> None:
    await asyncio.sleep(SLEEP)


# For the workflows: a pipeline of inc from 0; done runs after the chord's header (without its results).


@worker.task
async def inc(x: int) -> int:
    return x + 1


@worker.task
async def done() -> None:
    return None


TASKS = {"noop": noop, "sleep50": sleep50, "inc": inc, "done": done}
