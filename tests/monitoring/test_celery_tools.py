"""Celery's own tools against aqueue, and aqueue's against Celery: events, inspect and control, on Redis and RabbitMQ.

The Celery side runs as real subprocesses: Celery's ``EventReceiver``, the ``celery`` command line, a
``celery worker``.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aqueue import App
from aqueue.worker import Worker

from .celery_side import run_celery, running
from .conftest import Side
from .golden import golden
from .scenario import EVERY_EVENT, send_every_kind

pytestmark = pytest.mark.slow

MakeApp = Callable[..., App]

RECEIVER = """
import json, sys, threading
from celery.events import EventReceiver
from celery_side import app

want = set(json.loads(sys.argv[1]))
seen = set()


class Receiver(EventReceiver):
    def on_consume_ready(self, *args, **kwargs):
        super().on_consume_ready(*args, **kwargs)
        print("READY", flush=True)


def on_event(event):
    print(json.dumps(event), flush=True)
    seen.add(event["type"])
    if want <= seen:
        receiver.should_stop = True


with app.connection() as conn:
    receiver = Receiver(conn, handlers={"*": on_event}, app=app)
    deadline = threading.Timer(float(sys.argv[2]), lambda: setattr(receiver, "should_stop", True))
    deadline.daemon = True
    deadline.start()
    for _ in receiver.consume(safety_interval=0.2):
        pass
"""


async def test_celerys_event_receiver_sees_every_event(side: Side) -> None:
    (side.folder / "receiver.py").write_text(RECEIVER)
    argv = [sys.executable, "receiver.py", json.dumps(sorted(EVERY_EVENT)), "30"]
    # Given Celery's EventReceiver listening
    async with running(side.folder, *argv) as receiver:
        await receiver.wait_for("READY")
        # When an aqueue worker with -E, and a client sending task-sent, do every kind of thing
        name = f"w-{side.unique}@test"
        async with (
            side.app,
            Worker(side.app, concurrency=4, hostname=name, send_events=True, shutdown_timeout=2),
        ):
            await send_every_kind(side.app, name)
            with anyio.fail_after(15):
                while '"worker-heartbeat"' not in receiver.output:
                    await anyio.sleep(0.1)
        assert await receiver.finish(20) == 0
    # Then it saw each kind of event, with Celery's fields (plus what the receiver adds)
    events = [json.loads(line) for line in receiver.lines if line.startswith("{")]
    first: dict[str, dict[str, Any]] = {}
    for event in events:
        first.setdefault(event["type"], event)
    assert set(first) == EVERY_EVENT, receiver.output
    for kind, theirs in golden(side.transport.kind).events().items():
        assert sorted(set(first[kind]) - {"local_received"}) == sorted(theirs), kind
    assert {e["hostname"] for e in events if e["type"] != "task-sent"} == {name}


async def test_celerys_inspect_and_control_reach_an_aqueue_worker(side: Side) -> None:
    app, name = side.app, f"w-{side.unique}@test"
    async with app, Worker(app, concurrency=2, hostname=name, shutdown_timeout=0.2) as worker:
        sleeping = app.send_task("tasks.sleep", [30])
        with anyio.fail_after(5):
            while not worker.state.active:
                await anyio.sleep(0.02)
        # celery inspect ping
        code, out = await run_celery(side.folder, "inspect", "ping", "-d", name)
        assert code == 0, out
        assert f"->  {name}: OK" in out and "pong" in out and "1 node online." in out
        # celery inspect active: the running task
        code, out = await run_celery(side.folder, "inspect", "active", "-d", name)
        assert code == 0, out
        assert sleeping.id in out and "tasks.sleep" in out
        # celery control rate_limit: the worker applies it
        code, out = await run_celery(side.folder, "control", "rate_limit", "tasks.add", "10/m", "-d", name)
        assert code == 0, out
        assert "new rate limit set successfully" in out
        assert str(worker.runtimes["tasks.add"].bucket.rate) == "10/m"
        # and Celery's client reads stats, registered, active_queues, revoked and conf
        code, out = await run_celery(side.folder, "inspect", "stats", "--json", "-d", name)
        assert code == 0, out
        stats = json.loads(out.splitlines()[-1])[name]
        assert stats["pool"]["max-concurrency"] == 2 and stats["prefetch_count"] == worker.prefetch


CELERY_TASKS = """
from celery_side import app


@app.task(name="tasks.mul")
def mul(x, y):
    return x * y
"""


async def test_aqueue_inspect_and_control_reach_a_celery_worker(side: Side) -> None:
    (side.folder / "celery_tasks.py").write_text(CELERY_TASKS)
    name = f"celery-{side.unique}@test"
    argv = ["-P", "solo", "-n", name, "-Q", side.transport.queue, "--without-gossip", "--without-mingle"]
    argv += ["--without-heartbeat", "-l", "info", "-I", "celery_tasks"]
    # Given a Celery worker
    command = [sys.executable, "-m", "celery", "-A", "celery_side", "worker", *argv]
    async with running(side.folder, *command, stop_signal=signal.SIGKILL) as celery:  # its shutdown is slow
        await celery.wait_for(" ready.")
        app = side.app
        # Then aqueue's inspect and control reach it
        assert await app.control.ping(destination=[name], timeout=5) == [{name: {"ok": "pong"}}]
        registered = await app.control.inspect("registered", destination=[name], timeout=5)
        assert "tasks.mul" in registered[0][name]["ok"]
        stats = (await app.control.inspect("stats", destination=[name], timeout=5))[0][name]["ok"]
        assert stats["pool"]["max-concurrency"] == 1
        replies = await app.control.rate_limit("tasks.mul", "5/s", destination=[name], timeout=5)
        assert replies == [{name: {"ok": "new rate limit set successfully"}}]
        await celery.wait_for("New rate limit for tasks of type tasks.mul: 5/s.")


async def test_aqueue_worker_without_events_starts_them_when_asked(side: Side) -> None:
    # Given a worker started without -E: Flower and `celery control enable_events` turn task events on
    app, name = side.app, f"w-{side.unique}@test"
    async with app, Worker(app, hostname=name) as worker:
        assert worker.monitoring.events is None
        code, out = await run_celery(side.folder, "control", "enable_events", "-d", name)
        assert code == 0 and "task events enabled" in out, out
        assert worker.monitoring.events is not None and "task" in worker.monitoring.events.groups
