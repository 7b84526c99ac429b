"""Command-line tests: a project folder with its own ``tasks.py``, CLI runs, and real worker subprocesses.

Every subprocess is bounded: CLI runs have a timeout and are killed past it, and each worker started by
a test is terminated (then killed) at teardown, whatever the test did.

A project runs on SQLite, on Redis, or on RabbitMQ with its results in Redis (``rpc://`` replies reach
only the process that sent the task, and these tests read results from the test process). Redis keys
carry a prefix unique to the project and are deleted afterwards; on RabbitMQ the project's queues are
deleted afterwards, unless it has a vhost of its own, which its fixture deletes whole.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest

import aqueue
from aqueue.app import App
from tests.conftest import REDIS_URL, delete_exchanges, reap, require_server

__all__ = ["CliResult", "Project", "WorkerProcess", "open_project", "project_for", "reap"]

TRANSPORTS = ["sqlite", "redis"]
FLEET_TRANSPORTS = ["redis", "amqp"]
AMQP_HOST = "amqp://guest:guest@127.0.0.1:5672"
_MERGED_SETTINGS = ("broker_transport_options", "result_backend_transport_options")

TASKS_BODY = '''
import asyncio
import time
from pathlib import Path

from aqueue import App

app = App("tasks", broker={broker!r}, backend={backend!r}, **{settings!r})


@app.task
async def add(x, y):
    return x + y


@app.task
async def fail(message):
    raise ValueError(message)


@app.task
async def sleep(seconds, mark=None):
    """Sleeps; with ``mark``, appends 'start' and 'done' lines to that file to count runs."""
    if mark:
        with open(mark, "a") as f:
            f.write("start\\n")
    await asyncio.sleep(seconds)
    if mark:
        with open(mark, "a") as f:
            f.write("done\\n")
    return seconds
'''


@dataclass(frozen=True, slots=True)
class CliResult:
    """What one ``python -m aqueue ...`` run printed, and its exit code."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def subprocess_env() -> dict[str, str]:
    """The environment for aqueue subprocesses: no inherited broker settings, no stray import paths.

    Subprocesses import the same aqueue as the tests (this checkout, whatever is installed).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUEUE_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(aqueue.__file__).resolve().parent.parent)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """One ``python -m aqueue ... worker`` subprocess, its log read from a file."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        output: IO[bytes],
        log_path: Path,
        quit_signal: int = signal.SIGTERM,
    ) -> None:
        self.proc, self._output, self.log_path = proc, output, log_path
        self.output_path = Path(output.name)
        self.quit_signal = quit_signal
        """What the teardown sends first."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        """The log so far (the ``--logfile`` when one was given, else stdout and stderr)."""
        return _read(self.log_path)

    @property
    def output(self) -> str:
        """What the worker wrote to stdout and stderr (the banner; the log too without ``--logfile``)."""
        return _read(self.output_path)

    async def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """Wait until ``text`` is in the log; fail (showing the log) on timeout or if the worker exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log
            if text in log:
                return log
            if self.proc.poll() is not None:
                await asyncio.sleep(0.1)  # the last lines may still be on their way to the file
                if text in self.log:
                    return self.log
                pytest.fail(f"worker exited with {self.proc.returncode} before logging {text!r}:\n{self.log}")
            await asyncio.sleep(0.05)
        pytest.fail(f"worker did not log {text!r} within {timeout}s:\n{self.log}")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for the worker to exit; fail (the teardown kills it) when it does not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"worker {self.pid} still running after {timeout}s:\n{self.log}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.send_signal(signum)
        return await self.wait(timeout)

    def reap(self) -> None:
        """Make sure the process is gone: ``quit_signal``, then SIGKILL; always wait for it."""
        reap(self.proc, self.quit_signal)
        self._output.close()


class Project:
    """A folder holding ``tasks.py`` for one transport, where CLI commands and workers run.

    ``kind`` is ``sqlite``, ``redis`` or ``amqp``. ``redis_url`` points a Redis project (and the results
    of an AMQP one) at another server; ``amqp_url`` (no vhost) points an AMQP project at another
    RabbitMQ; ``vhost`` gives an AMQP project a vhost of its own.
    """

    def __init__(
        self,
        root: Path,
        kind: str,
        *,
        redis_url: str = REDIS_URL,
        amqp_url: str = AMQP_HOST,
        vhost: str | None = None,
    ) -> None:
        self.root, self.kind, self.vhost = root, kind, vhost
        self.unique = uuid.uuid4().hex[:10]
        self.workers: list[WorkerProcess] = []
        # Database 0: the shared fixtures flush databases 1-15 after their tests; ours are cleaned by prefix.
        self.redis_db = 0
        self.redis_url = f"{redis_url}/{self.redis_db}"
        self.broker_url, self.backend_url = self.redis_url, self.redis_url
        unique_names: dict[str, Any] = {
            "task_default_queue": f"celery-{self.unique}",
            "control_exchange": f"aqueue-{self.unique}",
            "result_expires": 300,
            "result_backend_transport_options": {"global_keyprefix": f"t{self.unique}:"},
        }
        if kind == "redis":
            self.base_settings: dict[str, Any] = {
                "broker_transport_options": {"global_keyprefix": f"t{self.unique}:"},
                **unique_names,
            }
        elif kind == "amqp":
            self.broker_url = f"{amqp_url}/{quote(vhost, safe='') if vhost else '/'}"
            self.base_settings = unique_names
        else:
            self.broker_url, self.backend_url = "sqlite:///broker.db", "sqlite:///results.db"
            self.base_settings = {}
        self.settings: dict[str, Any] = {}
        self.write_tasks()

    @property
    def default_queue(self) -> str:
        return str(self.settings.get("task_default_queue", "celery"))

    def write_tasks(self, extra: str = "", **settings: Any) -> None:
        """(Re)write ``tasks.py`` with the app's settings merged over the transport's, plus ``extra`` code."""
        self.settings = {**self.base_settings, **settings}
        for name in _MERGED_SETTINGS:
            if name in self.base_settings and name in settings:
                self.settings[name] = {**self.base_settings[name], **settings[name]}
        body = TASKS_BODY.format(broker=self.broker_url, backend=self.backend_url, settings=self.settings)
        (self.root / "tasks.py").write_text(body + extra)

    def app(self) -> App:
        """An App in the test process that shares the subprocesses' broker and result backend."""
        broker, backend = self.broker_url, self.backend_url
        if self.kind == "sqlite":
            broker, backend = f"sqlite:///{self.root}/broker.db", f"sqlite:///{self.root}/results.db"
        return App("tasks", broker=broker, backend=backend, **self.settings)

    async def cli(self, *args: str, timeout: float = 30.0) -> CliResult:
        """Run ``python -m aqueue -A tasks ARGS`` here and return what it printed."""
        return await self.run([sys.executable, "-m", "aqueue", "-A", "tasks", *args], timeout)

    async def run(
        self, argv: list[str], timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> CliResult:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.root,
            env=env or subprocess_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"{argv[3:]} did not finish within {timeout}s")
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(), err.decode())

    def spawn_worker(
        self, *args: str, argv: list[str] | None = None, logfile: str | None = None
    ) -> WorkerProcess:
        """Start ``python -m aqueue -A tasks worker -l info ARGS`` (or ``argv``) without waiting for it.

        ``logfile`` names the file the worker logs to when the arguments include ``--logfile``.
        """
        command = argv or [sys.executable, "-m", "aqueue", "-A", "tasks", "worker", "-l", "info", *args]
        output = (self.root / f"worker-{len(self.workers) + 1}.out").open("ab")
        proc = subprocess.Popen(
            command,
            cwd=self.root,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        worker = WorkerProcess(proc, output, self.root / logfile if logfile else Path(output.name))
        self.workers.append(worker)
        return worker

    async def start_worker(
        self, *args: str, argv: list[str] | None = None, logfile: str | None = None, timeout: float = 20.0
    ) -> WorkerProcess:
        """Start a worker and wait until it logs that it is ready."""
        worker = self.spawn_worker(*args, argv=argv, logfile=logfile)
        await worker.wait_for(" ready.", timeout)
        return worker

    def close(self) -> None:
        """Reap the workers and delete the project's Redis keys (see :meth:`aclose` for RabbitMQ)."""
        for worker in self.workers:
            worker.reap()
        if self.kind in ("redis", "amqp"):
            _delete_redis_keys(self.redis_url, f"t{self.unique}:*")

    async def aclose(self) -> None:
        """:meth:`close`, then delete the project's queue on RabbitMQ's default vhost."""
        self.close()
        if self.kind == "amqp" and self.vhost is None:
            from aqueue.broker.amqp import AMQPBroker

            async with AMQPBroker(self.broker_url) as broker:
                await broker.delete_queue(self.default_queue)
                exchange = f"{self.settings.get('control_exchange', 'celery')}.pidbox"
                await delete_exchanges(broker, exchange, f"reply.{exchange}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _delete_redis_keys(url: str, pattern: str) -> None:
    import redis

    if not url.startswith("redis://"):
        return  # a private deployment (Sentinel), stopped whole by its fixture
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=pattern, count=500))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture
def sqlite_project(tmp_path: Path) -> Iterator[Project]:
    """A project on the embedded SQLite store."""
    project = Project(tmp_path, "sqlite")
    try:
        yield project
    finally:
        project.close()


@pytest.fixture(params=TRANSPORTS)
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """A project on each transport the command-line tests cover (SQLite, Redis)."""
    with project_for(request.param, tmp_path) as project:
        yield project


@contextmanager
def project_for(transport: str, root: Path) -> Iterator[Project]:
    """A project on ``transport`` (``sqlite``, ``redis``, or ``kombu``: Redis in kombu's layout), closed after."""
    if transport in ("redis", "kombu"):
        require_server("redis")
    project = Project(root, "redis" if transport == "kombu" else transport)
    if transport == "kombu":
        project.base_settings["broker_transport_options"]["layout"] = "kombu"
        project.write_tasks()
    try:
        yield project
    finally:
        project.close()


@asynccontextmanager
async def open_project(root: Path, kind: str) -> AsyncIterator[Project]:
    """A project of ``kind`` in ``root`` (its servers required), closed afterwards."""
    if kind != "sqlite":
        require_server("redis")
    if kind == "amqp":
        require_server("amqp")
    project = Project(root, kind)
    try:
        yield project
    finally:
        await project.aclose()


@pytest.fixture(params=FLEET_TRANSPORTS)
async def fleet_project(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Project]:
    """A project on each server transport: Redis, and RabbitMQ (default vhost) with Redis results."""
    async with open_project(tmp_path, request.param) as project:
        yield project


@pytest.fixture
async def client(project: Project) -> AsyncIterator[App]:
    """A connected App in the test process, on the project's broker and backend."""
    async with project.app() as app:
        yield app


@pytest.fixture
async def sqlite_client(sqlite_project: Project) -> AsyncIterator[App]:
    async with sqlite_project.app() as app:
        yield app
