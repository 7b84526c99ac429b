"""Celery: ``celery -A celery_app worker --pool=threads -c N``; sync tasks (Celery cannot run coroutines)."""

from __future__ import annotations

import os
import time

from _env import BACKEND_URL, REDIS_URL, SLEEP
from celery import Celery

app = Celery("celery_app", broker=os.environ.get("BENCH_BROKER_URL", REDIS_URL), backend=BACKEND_URL)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task
def noop() -> None:
    return None


@app.task
def sleep50() -> None:
    time.sleep(SLEEP)


# For the workflows: a chain of inc from 0, a chord's callback counting the header's results.


@app.task
def inc(x: int) -> int:
    return x + 1


@app.task
def count(results: list[object]) -> int:
    return len(results)
