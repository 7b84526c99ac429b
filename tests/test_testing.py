"""aqueue.testing: an app on memory:// with an in-process worker, and the pytest fixtures."""

from __future__ import annotations

import pytest

from aqueue import App
from aqueue.testing import on_memory, running_worker
from aqueue.worker import Worker

app = App(
    "testing-demo",
    broker="redis://127.0.0.1:1/0",
    backend="redis://127.0.0.1:1/0",
    task_routes={"testing-demo.low": "low"},
)


@app.task(name="testing-demo.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="testing-demo.low")
async def low() -> str:
    return "routed"


@pytest.fixture
def aqueue_app() -> App:
    return app


async def test_fixture_worker_runs_tasks_on_memory(aqueue_worker: Worker) -> None:
    # Given the plugin's worker for our app (configured for an unreachable Redis)
    # When tasks are sent, including one routed to another queue
    # Then they run in-process on memory://, and routed queues are consumed too
    assert await add.delay(4, 4).get(timeout=5) == 8
    assert await low.delay().get(timeout=5) == "routed"
    assert app.conf.broker_url is not None and app.conf.broker_url.startswith("memory://")


async def test_running_worker_restores_the_configuration_after() -> None:
    async with running_worker(app, concurrency=2) as worker:
        assert worker.concurrency == 2
        assert await add.delay(1, 2).get(timeout=5) == 3
    # Then the app points at its own broker again
    assert app.conf.broker_url == "redis://127.0.0.1:1/0"
    assert app.conf.result_backend == "redis://127.0.0.1:1/0"


def test_on_memory_gives_each_use_a_fresh_store() -> None:
    with on_memory(app):
        first = app.conf.broker_url
    with on_memory(app):
        second = app.conf.broker_url
    assert first != second
