"""aqueue: ``python -m aqueue -A aq_app worker -c N``; broker from BENCH_BROKER_URL (redis or amqp)."""

from __future__ import annotations

import asyncio
import os

from _env import BACKEND_URL, REDIS_URL, SLEEP

from aqueue import App

# BENCH_AQ_LAYOUT=kombu: Redis in kombu's list layout, the one shared with Celery.
LAYOUT = {"layout": os.environ["BENCH_AQ_LAYOUT"]} if os.environ.get("BENCH_AQ_LAYOUT") else {}
app = App(
    "aq_app",
    broker=os.environ.get("BENCH_BROKER_URL", REDIS_URL),
    backend=BACKEND_URL,
    broker_transport_options=LAYOUT,
)


@app.task
async def noop() -> None:
    return None


@app.task
async def sleep50() -> None:
    await asyncio.sleep(SLEEP)


# For the workflows: a chain of inc from 0, a chord's callback counting the header's results.


@app.task
async def inc(x: int) -> int:
    return x + 1


@app.task
async def count(results: list[object]) -> int:
    return len(results)
