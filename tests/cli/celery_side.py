"""The Celery side of a mixed fleet: a real Celery 5 app beside an aqueue project, in the same folder.

The folder of a :class:`~tests.cli.conftest.Project` gets ``celerytasks.py`` (a Celery app on the same
broker, result backend, queue and key prefix as the project's ``tasks.py``, with tasks of the same
names), ``shared_errors.py`` (an exception class both sides import) and ``celery_client.py`` (a Celery
client that sends the calls it is given and prints what ``result.get()`` gave, as JSON).
:func:`start_celery_worker` runs a real ``celery worker`` (``--pool threads``) there.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import Project, WorkerProcess, subprocess_env

__all__ = ["AQUEUE_TASKS", "CeleryCall", "celery_client", "prepare", "start_celery_worker"]

CELERY_TASKS = """
import os
import time

from celery import Celery

import shared_errors

app = Celery("tasks", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_RESULT_BACKEND"])
app.conf.update(
    task_default_queue=os.environ["CELERY_QUEUE"],
    result_backend_transport_options={"global_keyprefix": os.environ["CELERY_PREFIX"]},
    result_expires=300,
    broker_connection_retry_on_startup=True,
    **__import__("json").loads(os.environ.get("CELERY_SETTINGS", "{}")),
)


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="tasks.decline")
def decline(message):
    raise shared_errors.PaymentDeclined(message)


@app.task(name="tasks.record")
def record(value, path):
    with open(path, "a") as f:
        f.write(f"celery {value}\\n")
    return value
"""

AQUEUE_TASKS = """

import shared_errors


@app.task
async def decline(message):
    raise shared_errors.PaymentDeclined(message)


@app.task
async def record(value, path):
    with open(path, "a") as f:
        f.write(f"aqueue {value}\\n")
    return value
"""
"""Tasks added to the project's ``tasks.py``, named as the Celery app's."""

SHARED_ERRORS = '''
class PaymentDeclined(Exception):
    """A task's own exception class, importable on both sides."""
'''

CLIENT = """
import json
import signal
import sys
import time
from datetime import datetime, timedelta, timezone

from celerytasks import app

calls = json.loads(sys.argv[1])
sent = []
for call in calls:
    options = dict(call.get("options", {}))
    if "eta_in" in call:
        options["eta"] = datetime.now(timezone.utc) + timedelta(seconds=call["eta_in"])
    started = time.time()
    sent.append((started, app.send_task(call["task"], args=call.get("args", []), kwargs={}, **options)))
out = []
for (started, result), call in zip(sent, calls):
    entry = {"id": result.id, "sent": started}
    if call.get("nowait"):
        out.append(dict(entry, state="SENT", done=None))
        continue
    try:
        entry["result"] = result.get(timeout=call.get("timeout", 20))
    except Exception as exc:
        entry["error"] = {"type": type(exc).__name__, "module": type(exc).__module__, "args": [str(a) for a in exc.args]}
    entry["state"] = result.state
    entry["done"] = result.date_done.timestamp() if result.date_done else None
    out.append(entry)
print(json.dumps(out))
"""


def prepare(project: Project) -> None:
    """Write the Celery side's files into ``project``'s folder (its ``tasks.py`` gets AQUEUE_TASKS)."""
    (project.root / "celerytasks.py").write_text(CELERY_TASKS)
    (project.root / "shared_errors.py").write_text(SHARED_ERRORS)
    (project.root / "celery_client.py").write_text(CLIENT)


def celery_env(project: Project, **settings: Any) -> dict[str, str]:
    """The Celery processes' environment: the project's broker, backend, queue and key prefix."""
    env = subprocess_env()
    env["PYTHONPATH"] = str(project.root)
    prefix = project.settings.get("result_backend_transport_options", {}).get("global_keyprefix", "")
    if project.kind == "redis":  # kombu's keys on the aqueue side's prefix
        broker_prefix = project.settings.get("broker_transport_options", {}).get("global_keyprefix", "")
        settings = {"broker_transport_options": {"global_keyprefix": broker_prefix}, **settings}
    env.update(
        CELERY_BROKER_URL=project.broker_url,
        CELERY_RESULT_BACKEND=project.backend_url,
        CELERY_QUEUE=project.default_queue,
        CELERY_PREFIX=prefix,
        CELERY_SETTINGS=json.dumps(settings),
    )
    return env


async def start_celery_worker(project: Project, *args: str, **settings: Any) -> WorkerProcess:
    """A ``celery worker`` (threads pool) on the project's queue, with Celery ``settings``; once ready."""
    import subprocess

    name = f"celery-{len(project.workers) + 1}-{project.unique}@localhost"
    argv = [sys.executable, "-m", "celery", "-A", "celerytasks", "worker", "--pool", "threads", "-c", "4"]
    argv += ["-Q", project.default_queue, "-n", name, "-l", "info", *args]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    output = (project.root / f"celery-worker-{len(project.workers) + 1}.out").open("ab")
    proc = subprocess.Popen(
        argv,
        cwd=project.root,
        env=celery_env(project, **settings),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    # Torn down with SIGKILL: on SIGTERM (or SIGQUIT) Celery 5.7's worker here logs its warm (cold)
    # shutdown and then stays until the teardown's SIGKILL five seconds later; every check is done by then.
    worker = WorkerProcess(proc, output, Path(output.name), quit_signal=signal.SIGKILL)
    project.workers.append(worker)
    await worker.wait_for(" ready.", timeout=30)
    return worker


@dataclass(frozen=True, slots=True)
class CeleryCall:
    """What a Celery client's ``result.get()`` gave for one call."""

    id: str
    sent: float
    state: str
    done: float | None
    result: Any = None
    error: dict[str, Any] | None = None


async def celery_client(project: Project, calls: list[dict[str, Any]], **settings: Any) -> list[CeleryCall]:
    """Run a Celery client that sends ``calls`` (``task``, ``args``, ``options``, ``eta_in``, ``nowait``),
    all first, then waits for each result (but the ``nowait`` ones); what each gave."""
    argv = [sys.executable, "celery_client.py", json.dumps(calls)]
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=project.root,
        env=celery_env(project, **settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the Celery client did not finish within 60 s")
    if proc.returncode != 0:
        pytest.fail(f"the Celery client failed ({proc.returncode}):\n{err.decode()}")
    return [CeleryCall(**entry) for entry in json.loads(out)]
