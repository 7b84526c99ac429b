"""Settings every benchmark app reads from the environment, set by ``run.py`` for each job."""

from __future__ import annotations

import os

__all__ = ["AMQP_URL", "BACKEND_URL", "CONCURRENCY", "POLL", "POOL", "REDIS_URL", "SLEEP"]

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# The result backend for libraries that take a URL (aqueue, Celery): a redis:// URL or rpc://.
BACKEND_URL = os.environ.get("BENCH_BACKEND_URL", REDIS_URL)
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "100"))
# Poll interval (seconds) for libraries whose worker or result wait polls (arq, taskiq).
POLL = float(os.environ.get("BENCH_POLL", "0.01"))
# Connection pool size for the libraries whose client's default pool (redis-py 8: 100, coredis: 64)
# errors out or deadlocks at the benchmark's concurrency (SAQ, Dramatiq, streaq).
POOL = 2000
# W3's task: await asyncio.sleep(SLEEP).
SLEEP = 0.05
