"""The tasks and calls that make a worker send every kind of event, as the golden capture's Celery worker did."""

from __future__ import annotations

import uuid
from typing import Any

import anyio

from aqueue import App
from aqueue.exceptions import Reject

TASK_EVENTS = (
    "task-sent",
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "task-retried",
    "task-revoked",
    "task-rejected",
)
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")
EVERY_EVENT = frozenset(TASK_EVENTS + WORKER_EVENTS)


def define_tasks(app: App) -> None:
    """``tasks.add``, ``tasks.fail``, ``tasks.retry`` (once), ``tasks.reject`` (late ack), ``tasks.sleep``."""

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.fail")
    async def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="tasks.retry", bind=True, max_retries=1)
    async def retry(self: Any) -> str:
        if not self.request.retries:
            raise self.retry(countdown=0, exc=KeyError("again"))
        return "done"

    @app.task(name="tasks.reject", acks_late=True)
    async def reject() -> None:
        raise Reject("refused", requeue=False)

    @app.task(name="tasks.sleep")
    async def sleep(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds


async def send_every_kind(app: App, worker_name: str) -> dict[str, str]:
    """Send tasks that succeed, fail, retry, are rejected, revoked, expired and unknown; their ids by kind.

    The revoke goes to ``worker_name`` first, so the revoked task is refused on arrival.
    """
    ids = {
        "add": (await app.send_task("tasks.add", [2, 2])).id,
        "fail": (await app.send_task("tasks.fail", ["boom"])).id,
        "retry": (await app.send_task("tasks.retry")).id,
        "reject": (await app.send_task("tasks.reject")).id,
    }
    ids["revoked"] = str(uuid.uuid4())
    await app.control.revoke(ids["revoked"], destination=[worker_name], timeout=5)
    await app.send_task("tasks.add", [3, 3], task_id=ids["revoked"])
    ids["expired"] = (await app.send_task("tasks.add", [4, 4], expires=-10.0)).id
    ids["unknown"] = (await app.send_task("tasks.unknown")).id
    return ids
