"""arq: ``arq arq_app.WorkerSettings`` (runs in its own virtualenv: arq pins redis<6)."""

from __future__ import annotations

import asyncio
from typing import Any

from _env import CONCURRENCY, POLL, REDIS_URL, SLEEP
from arq.connections import RedisSettings


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def sleep50(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(SLEEP)


class WorkerSettings:
    functions = [noop, sleep50]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = CONCURRENCY
    # arq's worker polls a sorted set; its default 0.5 s would dominate every figure.
    poll_delay = POLL


# For ``arq --custom-log-dict arq_app.LOG_CONFIG``: WARNING, as every other worker here (arq's default
# logs two INFO lines per job).
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"arq.standard": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["arq.standard"], "level": "WARNING"}},
}
