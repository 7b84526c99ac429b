"""An unmodified Flower, run as ``celery flower``, shows aqueue workers and their tasks (Redis and RabbitMQ)."""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import httpx
import pytest

from aqueue.worker import Worker

from .celery_side import free_port, running
from .conftest import Side

pytestmark = pytest.mark.slow


async def poll(http: httpx.AsyncClient, path: str, ready: Any, timeout: float = 20.0) -> Any:
    """GET ``path`` until ``ready(json)`` is true; fail with the last answer past ``timeout``."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            answer = await http.get(path)
            last = answer.json() if answer.status_code == 200 else answer.status_code
            if answer.status_code == 200 and ready(last):
                return last
        except (httpx.TransportError, ValueError) as exc:
            last = exc
        await anyio.sleep(0.25)
    pytest.fail(f"GET {path} did not show it within {timeout}s; last answer: {last!r}")


async def test_flower_lists_an_aqueue_worker_and_a_finished_task(side: Side) -> None:
    port, name, app = free_port(), f"w-{side.unique}@test", side.app
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_side",
        "flower",
        "--address=127.0.0.1",
        f"--port={port}",
    ]
    # Given Flower, capturing events
    async with running(side.folder, *argv) as flower:
        await flower.wait_for("Connected to ")
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
            app,
            Worker(app, concurrency=4, hostname=name, send_events=True),
        ):
            # When an aqueue worker runs a task
            sent = await app.send_task("tasks.add", [2, 3])
            # Then /api/tasks lists it as succeeded, with its result and worker
            tasks = await poll(http, "/api/tasks", lambda t: t.get(sent.id, {}).get("state") == "SUCCESS")
            task = tasks[sent.id]
            assert (task["name"], task["result"], task["worker"]) == ("tasks.add", "5", name)
            # And /api/workers lists the worker with what inspect told (stats, registered, queues)
            # (each refresh asks again; Flower fills in each inspect reply that came in time)
            told = {"stats", "registered", "active_queues"}
            workers = await poll(http, "/api/workers?refresh=1", lambda w: told <= set(w.get(name, {})))
            worker = workers[name]
            assert worker["stats"]["pool"]["max-concurrency"] == 4
            assert "tasks.add" in worker["registered"]
            assert [q["name"] for q in worker["active_queues"]] == [side.transport.queue]
            # And Flower's pages for it render
            for page in (f"/worker/{name}", "/workers", "/tasks", f"/task/{sent.id}"):
                assert (await http.get(page)).status_code == 200, page
