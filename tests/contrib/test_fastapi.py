"""The FastAPI example through httpx on the ASGI app, with the worker embedded by the lifespan."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from aqueue import App
from aqueue.contrib.fastapi import AqueueApp, lifespan
from aqueue.testing import on_memory

EXAMPLE = Path(__file__).parents[2] / "examples" / "fastapi_app.py"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastapi_app"] = module
    spec.loader.exec_module(module)
    with on_memory(module.app):
        yield module
    sys.modules.pop("fastapi_app", None)


@asynccontextmanager
async def serve(api: FastAPI, app: App, worker: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    async with lifespan(app, worker=worker, concurrency=20, shutdown_timeout=2)(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def test_post_add_answers_202_with_id_and_status_url_then_status_shows_result(
    example: ModuleType,
) -> None:
    # Given the example app with its worker embedded by the lifespan
    async with serve(example.api, example.app) as client:
        # When a client posts numbers
        response = await client.post("/add", json={"x": 4, "y": 4})
        # Then it is accepted with the task id and a status URL
        assert response.status_code == 202
        body = response.json()
        assert body["status_url"].endswith(f"/tasks/{body['id']}")
        # And the status URL soon shows SUCCESS with the result
        with anyio.fail_after(10):
            while (status := (await client.get(f"/tasks/{body['id']}")).json())["state"] != "SUCCESS":
                await anyio.sleep(0.02)
        assert status == {"id": body["id"], "state": "SUCCESS", "result": 8}


async def test_add_wait_returns_the_result(example: ModuleType) -> None:
    async with serve(example.api, example.app) as client:
        response = await client.post("/add/wait", params={"timeout": 5}, json={"x": 2, "y": 3})
    assert response.status_code == 200
    assert response.json()["result"] == 5


async def test_add_wait_answers_504_when_no_worker_finishes_in_time(example: ModuleType) -> None:
    # Given no worker running
    async with serve(example.api, example.app, worker=False) as client:
        # When the client waits for a result with a short timeout
        response = await client.post("/add/wait", params={"timeout": 0.2}, json={"x": 2, "y": 3})
    # Then it gets a gateway timeout, not a 500
    assert response.status_code == 504


async def test_unknown_task_id_is_pending_not_an_error(example: ModuleType) -> None:
    async with serve(example.api, example.app) as client:
        response = await client.get(f"/tasks/{uuid.uuid4()}")
    assert response.status_code == 200
    assert response.json()["state"] == "PENDING"


async def test_failed_task_status_shows_the_error() -> None:
    # Given an app with a failing task, served through the lifespan helper
    app = App("failing")

    @app.task
    async def fail() -> None:
        raise ValueError("bad input")

    api = FastAPI()

    @api.post("/fail")
    async def send(aqueue: AqueueApp) -> dict[str, Any]:
        result = await fail.delay()
        try:
            await result.get(timeout=5)
        except ValueError as exc:
            return {"state": result.state, "error": str(exc)}
        return {"state": result.state}

    with on_memory(app):
        async with serve(api, app) as client:
            response = await client.post("/fail")
    # Then the handler saw the original exception class and message
    assert response.json() == {"state": "FAILURE", "error": "bad input"}


async def test_user_lifespan_runs_inside_and_its_state_is_kept() -> None:
    # Given the user's own lifespan yielding state
    events: list[str] = []

    @asynccontextmanager
    async def mine(api: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("start")
        yield {"greeting": "hello"}
        events.append("stop")

    app = App("composed")
    api = FastAPI(lifespan=lifespan(app, lifespan=mine))

    with on_memory(app):
        async with api.router.lifespan_context(api) as state:
            # Then the user's lifespan ran, its state is passed on, and the app is connected
            assert events == ["start"]
            assert state == {"greeting": "hello"}
            assert api.state.aqueue_app is app
    assert events == ["start", "stop"]


async def test_dependency_without_lifespan_says_what_to_do() -> None:
    api = FastAPI()

    @api.get("/")
    async def root(aqueue: AqueueApp) -> dict[str, str]:
        return {"name": str(aqueue.main)}

    transport = httpx.ASGITransport(app=api, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with pytest.raises(RuntimeError, match="lifespan"):
            await client.get("/")


async def test_shutdown_lets_a_running_task_finish() -> None:
    # Given a worker embedded by the lifespan, running a task that takes a moment
    app = App("graceful")
    started = anyio.Event()

    @app.task
    async def slow() -> str:
        started.set()
        await anyio.sleep(0.3)
        return "done"

    with on_memory(app):
        async with lifespan(app, worker=True, shutdown_timeout=5)(FastAPI()):
            result = await slow.delay()
            with anyio.fail_after(5):
                await started.wait()
        # When the server shut down while the task ran; Then the task finished and its result is stored
        async with app:
            assert await result.get(timeout=1) == "done"
