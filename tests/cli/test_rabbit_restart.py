"""Workers, clients and the AMQP broker across a RabbitMQ restart (``rabbitmqctl stop_app`` / ``start_app``).

The shared RabbitMQ on 127.0.0.1:5672 is never stopped: each test starts a private node of its own on
spare loopback ports, with its data, logs and Erlang cookie in the test's temporary folder, and stops
it afterwards. Task results go to Redis under a prefix unique to the test, except in the ``rpc://``
test, whose client is the test process itself.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aqueue.app import App
from aqueue.broker.amqp import AMQPBroker
from aqueue.exceptions import DeliveryLost, OperationalError
from aqueue.message import Envelope
from aqueue.result.asyncresult import AsyncResult
from tests.conftest import CI, require_server

from .conftest import Project, WorkerProcess
from .test_fleet import AQUEUE_DIR, collect, send_all, wait_for_lines, write_tasks

pytestmark = pytest.mark.slow

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib/rabbitmq/bin"])
_LOOPBACK_ONLY = "-kernel inet_dist_use_interface {127,0,0,1}"


def _spare_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rabbit_scripts() -> Path | None:
    """The folder of RabbitMQ's own scripts.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that runs them as the ``rabbitmq`` user, with
    that user's home and a fixed log file; the scripts beside its target take our environment as it is.
    """
    found = shutil.which("rabbitmq-server", path=_SEARCH_PATH)
    return None if found is None else Path(found).resolve().parent


class RabbitServer:
    """A private RabbitMQ node on spare loopback ports; everything it writes stays under ``root``.

    Its node name is unique; its own environment file, config file (one TCP listener on 127.0.0.1) and
    empty plugin list keep ``/etc/rabbitmq`` out, so no management or Prometheus listener takes a
    fixed port. ``HOME`` holds the Erlang cookie the node and ``rabbitmqctl`` share. The node uses the
    machine's epmd, which it leaves running.
    """

    def __init__(self, root: Path, scripts: Path) -> None:
        self.root, self.scripts = root, scripts
        self.node = f"aqtest-{uuid.uuid4().hex[:10]}@localhost"
        self.port = _spare_port()
        self.dist_port = _spare_port()
        while self.dist_port == self.port:
            self.dist_port = _spare_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>``, without a vhost (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        logs = sorted((self.root / "log").glob("*.log"))
        return "\n".join(path.read_text(errors="replace") for path in [*logs, self.root / "server.out"])

    def _env(self) -> dict[str, str]:
        root = self.root
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env |= {
            "HOME": str(root),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": _LOOPBACK_ONLY,
        }
        return env

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        cookie = self.root / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)

    async def start(self, timeout: float = 60.0) -> None:
        """Start the node in a session of its own and wait until RabbitMQ runs on it."""
        self._write_files()
        with (self.root / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                cwd=self.root,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # ``wait`` returns once the node has written its pid file and RabbitMQ runs on it; a node that
        # dies first (say its port was taken meanwhile) fails the test at once rather than at the timeout.
        pid_file = str(self.root / "rabbit.pid")
        waiting = asyncio.ensure_future(
            self.ctl("wait", pid_file, "--timeout", str(int(timeout)), timeout=timeout + 10, check=False)
        )
        try:
            while not waiting.done() and self.proc.poll() is None:
                await asyncio.sleep(0.1)
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        if waiting.cancelled() or waiting.result().returncode != 0 or self.proc.poll() is not None:
            said = "" if waiting.cancelled() else waiting.result().stdout + waiting.result().stderr
            pytest.fail(f"RabbitMQ node {self.node} did not start:\n{said}\n{self.log}")

    async def ctl(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> ARGS``; fails the test when it fails (unless ``check=False``) or hangs."""
        proc = await asyncio.create_subprocess_exec(
            str(self.scripts / "rabbitmqctl"),
            "-n",
            self.node,
            *args,
            env=self._env(),
            cwd=self.root,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException as exc:  # a timeout, or the caller gave up: never leave it running
            proc.kill()
            await proc.wait()
            if isinstance(exc, TimeoutError):
                pytest.fail(f"rabbitmqctl {' '.join(args)} did not finish within {timeout}s")
            raise
        assert proc.returncode is not None
        done = subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())
        if check and done.returncode != 0:
            said = done.stdout + done.stderr
            pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n{said}")
        return done

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application (every connection closes; the Erlang node stays up)."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup", "--timeout", "30", timeout=40)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the node with ``rabbitmqctl stop`` and wait until its processes have exited."""
        if self.proc is None or self.proc.poll() is not None:
            return
        await self.ctl("stop", str(self.root / "rabbit.pid"), timeout=timeout, check=False)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def reap(self) -> None:
        """Kill whatever is left of the node's process group, then delete its data (the logs stay)."""
        if self.proc is not None and self.proc.poll() is None:
            # The shell script leads the group, and is waited for only below: the group id is still ours.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        shutil.rmtree(self.root / "mnesia", ignore_errors=True)


@pytest.fixture
async def private_rabbit(tmp_path: Path) -> AsyncIterator[RabbitServer]:
    scripts = _rabbit_scripts()
    if scripts is None:
        message = "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    server = RabbitServer(tmp_path / "rabbit", scripts)
    try:
        await server.start()
        yield server
    finally:
        try:
            await server.stop()
        finally:
            server.reap()


@pytest.fixture
async def rabbit_project(tmp_path: Path, private_rabbit: RabbitServer) -> AsyncIterator[Project]:
    """An AMQP project on the private node, its results in the shared Redis (the node goes with its queues)."""
    require_server("redis")
    project = Project(tmp_path, "amqp", amqp_url=private_rabbit.url)
    try:
        yield project
    finally:
        project.close()


async def restart(server: RabbitServer, down: float = 1.5) -> None:
    """``stop_app``, ``down`` seconds with RabbitMQ stopped, then ``start_app``."""
    await server.stop_app()
    await anyio.sleep(down)
    await server.start_app()


async def acks_late_worker(project: Project) -> WorkerProcess:
    """A worker running 4 tasks at a time, each acknowledged once it has finished."""
    write_tasks(project, task_acks_late=True)
    return await project.start_worker("-c", "4")


async def slow_tasks_running(client: App, mark: Path, count: int) -> list[AsyncResult[Any]]:
    """Send ``count`` half-second tasks (durable, persistent, confirmed); return once 4 of them run."""
    sent = await send_all(client, "tasks.slow", [[0.5, str(mark)] for _ in range(count)])
    await wait_for_lines(mark, 4)
    return sent


def aqueue_frames(worker: WorkerProcess) -> list[str]:
    """Traceback lines of the worker's log that point into aqueue's own code."""
    frames = [line for line in worker.log.splitlines() if line.strip().startswith('File "')]
    return [frame for frame in frames if AQUEUE_DIR in frame]


# Worker and client ----------------------------------------------------------------------------------


async def test_worker_and_client_survive_stop_app_and_start_app(
    private_rabbit: RabbitServer, rabbit_project: Project
) -> None:
    # Given: a worker (acks_late, 4 at a time) on the private node, with 20 half-second tasks sent
    # (durable, persistent, confirmed) and some of them running
    worker = await acks_late_worker(rabbit_project)
    mark = rabbit_project.root / "runs.txt"
    async with rabbit_project.app() as client:
        before = await slow_tasks_running(client, mark, 20)

        # When: RabbitMQ stops, 5 more tasks are sent while it is down, and it starts again
        await private_rabbit.stop_app()
        during = [client.send_task("tasks.slow", [0.2, str(mark)]) for _ in range(5)]
        await anyio.sleep(1.5)
        await private_rabbit.start_app()

        # Then: those sent while it was down are confirmed once the client has reconnected ...
        with anyio.fail_after(20):
            await asyncio.gather(*during)

        # ... and every task, sent before, during and after, completes
        after = await send_all(client, "tasks.slow", [[0.1, str(mark)] for _ in range(20)])
        assert await collect(before + during + after, timeout=40) == [0.5] * 20 + [0.2] * 5 + [0.1] * 20

    # And: the worker is still running, and no error came from its own code
    assert worker.proc.poll() is None
    assert not aqueue_frames(worker), worker.log
    done = [line for line in mark.read_text().splitlines() if line.startswith("done")]
    assert len(done) >= 45


async def test_rpc_client_gets_results_across_stop_app_and_start_app(
    private_rabbit: RabbitServer, rabbit_project: Project
) -> None:
    # Given: a worker (acks_late) whose results go back over rpc:// to this test process, with 12
    # confirmed tasks sent and some of them running
    rabbit_project.backend_url = "rpc://"
    worker = await acks_late_worker(rabbit_project)
    mark = rabbit_project.root / "runs.txt"
    async with rabbit_project.app() as client:
        before = await slow_tasks_running(client, mark, 12)

        # When: RabbitMQ stops and starts again
        await restart(private_rabbit)

        # Then: the reply queue is back, and every task, before and after, reports its result here
        after = await send_all(client, "tasks.add", [[n, n] for n in range(20)])
        assert await collect(before + after, timeout=40) == [0.5] * 12 + [2 * n for n in range(20)]

    # And: the worker is still running, and no error came from its own code
    assert worker.proc.poll() is None
    assert not aqueue_frames(worker), worker.log


# Broker -----------------------------------------------------------------------------------------------


def envelopes(queue: str, names: list[str]) -> list[Envelope]:
    return [Envelope(name, queue, name.encode(), "application/json") for name in names]


async def publish_when_back(broker: AMQPBroker, batch: list[Envelope], timeout: float = 20.0) -> None:
    """Publish ``batch`` (confirmed), trying again while the broker is still reconnecting."""
    with anyio.fail_after(timeout):
        while True:
            try:
                return await broker.publish(batch)
            except OperationalError:
                await anyio.sleep(0.1)


async def test_confirmed_messages_survive_stop_app_and_start_app(
    private_rabbit: RabbitServer, unique: str
) -> None:
    queue = f"t-restart-{unique}"
    async with AMQPBroker(f"{private_rabbit.url}//") as broker:
        # Given: 50 confirmed messages, and a consumer that acknowledged 10 of them and holds 5 more
        names = [f"m{i}" for i in range(50)]
        await broker.publish(envelopes(queue, names))
        acked: list[str] = []
        async with broker.consume([queue], prefetch=5) as consumer:
            with anyio.fail_after(10):
                for _ in range(10):
                    delivery = await consumer.receive()
                    await delivery.ack()
                    acked.append(delivery.id)
                held = [await consumer.receive() for _ in range(5)]

            # When: RabbitMQ stops and starts again
            await restart(private_rabbit)

            # Then: the held deliveries cannot be acknowledged any more (RabbitMQ took them back) ...
            for delivery in held:
                with pytest.raises(DeliveryLost):
                    await delivery.ack()

            # ... the same broker publishes again once reconnected ...
            await publish_when_back(broker, envelopes(queue, ["after"]))

            # ... and the consumer receives every confirmed message not acknowledged before, the held
            # ones included, and none of the acknowledged ones
            seen: list[str] = []
            with anyio.fail_after(20):
                while len(seen) < 41:
                    delivery = await consumer.receive()
                    await delivery.ack()
                    seen.append(delivery.id)
    assert sorted(acked + seen) == sorted([*names, "after"]), (acked, seen)
