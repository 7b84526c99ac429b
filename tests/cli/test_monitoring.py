"""``aqueue events``, ``worker -E`` and ``worker --metrics-port`` as subprocesses, on SQLite, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import delete_exchanges, require_server

from .conftest import Project, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "redis", "amqp"])
async def any_project(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Project]:
    """A project on each broker; on RabbitMQ with an event exchange of its own, deleted afterwards."""
    if request.param != "sqlite":
        require_server("redis")
        require_server(request.param)
    project = Project(tmp_path, request.param)
    if request.param == "amqp":
        project.write_tasks(event_exchange=f"celeryev-{project.unique}")
    try:
        yield project
    finally:
        await project.aclose()
        if request.param == "amqp":
            from aqueue.broker.amqp import AMQPBroker

            async with AMQPBroker(project.broker_url) as broker:
                await delete_exchanges(broker, f"celeryev-{project.unique}")


class Lines:
    """A subprocess whose stdout is read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc, self.lines = proc, list[str]()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    async def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        with anyio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                await anyio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self._reader.cancel()


async def start_cli(project: Project, *args: str) -> Lines:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aqueue", "-A", "tasks", *args,
        cwd=project.root, env=subprocess_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    return Lines(proc)


async def test_events_dump_prints_a_line_per_event(any_project: Project) -> None:
    # Given `events --dump` capturing
    dump = await start_cli(any_project, "events", "--dump")
    try:
        await dump.wait_for("starting capture")
        # When a worker with -E runs a task
        worker = await any_project.start_worker("-E", "-n", "w1@test")
        async with any_project.app() as client:
            result = await client.send_task("tasks.add", [2, 2])
            # Then each event is one line, as `celery events --dump` prints it
            await dump.wait_for(r"^w1@test \[.*\] started: ")
            received = await dump.wait_for(rf"task received: tasks\.add\({result.id}\)")
            assert "args=[2, 2] kwargs={}" in received
            await dump.wait_for(rf"task started: tasks\.add\({result.id}\) args=\[2, 2\]")
            succeeded = await dump.wait_for(rf"task succeeded: tasks\.add\({result.id}\)")
            assert re.search(r"result=4, runtime=[\d.e-]+", succeeded), succeeded
            await dump.wait_for(r"^w1@test \[.*\] heartbeat: active=0", timeout=10)
        assert await worker.stop() == 0
        await dump.wait_for(r"^w1@test \[.*\] shutdown: ")
    finally:
        await dump.stop()


async def test_events_json_and_limit(sqlite_project: Project) -> None:
    await sqlite_project.start_worker("-E", "-n", "w1@test")
    listen = await start_cli(sqlite_project, "events", "--json", "--routing-key", "worker.#", "--limit", "2")
    try:
        assert await listen.proc.wait() == 0
    finally:
        await listen.stop()
    events = [json.loads(line) for line in listen.lines if line.startswith("{")]
    assert [e["type"] for e in events] == ["worker-heartbeat", "worker-heartbeat"]
    assert events[0]["hostname"] == "w1@test" and events[0]["sw_ident"] == "py-aqueue"


async def test_the_banner_says_whether_task_events_are_on(sqlite_project: Project) -> None:
    on = await sqlite_project.start_worker("-E", "-n", "on@test")
    off = await sqlite_project.start_worker("-n", "off@test")
    assert ".> task events: ON" in on.output
    assert ".> task events: OFF (enable -E to monitor tasks in this worker)" in off.output


async def test_metrics_port_serves_prometheus_metrics(project: Project) -> None:
    project.write_tasks(worker_metrics_address="127.0.0.1")
    worker = await project.start_worker("--metrics-port", "0", "-n", "w1@test")
    log = await worker.wait_for("Serving Prometheus metrics on")
    url = re.search(r"http://127\.0\.0\.1:\d+/metrics", log)
    assert url is not None
    async with project.app() as client:
        assert await (await client.send_task("tasks.add", [1, 1])).get(timeout=10) == 2
    async with httpx.AsyncClient(timeout=5) as http:
        with anyio.fail_after(10):
            while True:
                text = (await http.get(url.group())).text
                samples = {
                    (s.name, tuple(s.labels.values())): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                }
                if samples.get(("aqueue_tasks_succeeded_total", ("tasks.add",))) == 1:
                    break
                await anyio.sleep(0.1)
    assert samples[("aqueue_task_runtime_seconds_count", ("tasks.add",))] == 1
    assert await worker.stop() == 0
