"""Testing your tasks without a broker: your app on ``memory://`` with an in-process worker.

As a pytest plugin (``pytest_plugins = ["aqueue.testing"]`` in your ``conftest.py``), override the
``aqueue_app`` fixture to return your app, then use ``aqueue_worker``::

    @pytest.fixture
    def aqueue_app():
        from myproject.tasks import app
        return app

    async def test_add(aqueue_worker):
        assert await add.delay(4, 4).get(timeout=5) == 8

Without pytest, ``async with running_worker(app):`` does the same.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from aqueue.app import App
from aqueue.worker import Worker

__all__ = ["aqueue_app", "aqueue_worker", "on_memory", "running_worker"]


@contextmanager
def on_memory(app: App) -> Iterator[App]:
    """Point ``app`` at a fresh ``memory://`` broker and backend for the block, then restore it."""
    name = f"memory://test-{uuid.uuid4().hex[:12]}"
    saved = (app.conf.broker_url, app.conf.result_backend, app._broker, app._backend, app._publisher)
    app.conf.broker_url, app.conf.result_backend = name, name
    app._broker = app._backend = app._publisher = None
    app._connected = False
    try:
        yield app
    finally:
        app.conf.broker_url, app.conf.result_backend = saved[0], saved[1]
        app._broker, app._backend, app._publisher = saved[2], saved[3], saved[4]
        app._connected = False


@asynccontextmanager
async def running_worker(app: App, **worker_options: Any) -> AsyncIterator[Worker]:
    """``app`` on a fresh ``memory://`` store with an in-process worker, torn down after the block.

    ``worker_options`` go to :class:`~aqueue.worker.Worker` (concurrency, queues, ...); by default the
    worker consumes every queue named in ``task_routes`` and by the tasks, plus the default queue.
    """
    with on_memory(app):
        worker_options.setdefault("queues", _all_queues(app))
        async with app, Worker(app, **worker_options) as worker:
            yield worker


def _all_queues(app: App) -> list[str]:
    queues = {app.conf.task_default_queue}
    queues.update(q for name in app.tasks if (q := app.options_for(name).queue))
    queues.update(app.router.queue_for(name) for name in app.tasks)
    return sorted(queues)


@pytest.fixture
def aqueue_app() -> App:
    """Override this fixture to return your app."""
    raise pytest.UsageError(
        "Override the 'aqueue_app' fixture in your conftest.py to return your aqueue App."
    )


@pytest.fixture
async def aqueue_worker(aqueue_app: App) -> AsyncIterator[Worker]:
    """Your app on ``memory://`` with a running in-process worker."""
    async with running_worker(aqueue_app) as worker:
        yield worker
