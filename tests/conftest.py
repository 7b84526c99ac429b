"""Shared fixtures: brokers, backends and apps over every transport.

Tests that need Redis or RabbitMQ fail under ``CI=true`` when the server cannot be reached, and skip
with a message saying how to start it otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqueue import App
from aqueue.broker import Broker
from aqueue.broker import from_url as broker_from_url
from aqueue.result import ResultBackend
from aqueue.result import from_url as backend_from_url

REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_HOW_TO_START = {
    "redis": "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no",
    "amqp": "rabbitmq-server -detached && rabbitmqctl await_startup",
}
_PORTS = {"redis": 6379, "amqp": 5672}
REDIS_TEST_DB = 15
"""Tests share this database and keep apart by key prefix; nothing flushes it (benchmarks use 1-10)."""


def require_server(kind: str) -> None:
    """Fail under CI, else skip, when the ``kind`` server is not listening on loopback."""
    try:
        socket.create_connection(("127.0.0.1", _PORTS[kind]), timeout=2).close()
    except OSError:
        message = f"{kind} is not reachable on 127.0.0.1:{_PORTS[kind]}; start it with: {_HOW_TO_START[kind]}"
        if CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def unique() -> str:
    """A short name unique to this test, for queues, channels and prefixes."""
    return uuid.uuid4().hex[:10]


class Transport:
    """URLs and options for one transport, unique to one test."""

    def __init__(self, kind: str, tmp_path: Path, unique: str) -> None:
        self.kind, self.unique = kind, unique
        self.redis_db = REDIS_TEST_DB
        self.queue = f"q-{unique}"
        if kind in ("redis", "kombu", "amqp", "rpc"):
            require_server({"rpc": "amqp", "kombu": "redis"}.get(kind, kind))
        self.broker_url = {
            "memory": f"memory://{unique}",
            "sqlite": f"sqlite:///{tmp_path}/broker.db",
            "redis": f"{REDIS_URL}/{self.redis_db}",
            "kombu": f"{REDIS_URL}/{self.redis_db}",
            "amqp": AMQP_URL,
            "rpc": AMQP_URL,
        }[kind]
        self.backend_url = {
            "memory": f"memory://{unique}",
            "sqlite": f"sqlite:///{tmp_path}/results.db",
            "redis": f"{REDIS_URL}/{self.redis_db}",
            "kombu": f"{REDIS_URL}/{self.redis_db}",
            "amqp": "rpc://",
            "rpc": "rpc://",
        }[kind]
        self.prefix = f"t{unique}:"
        redis = kind in ("redis", "kombu")
        self.broker_options: dict[str, Any] = {"global_keyprefix": self.prefix} if redis else {}
        if kind == "kombu":
            self.broker_options.update(layout="kombu", claim_timeout=2.0)
        self.backend_options: dict[str, Any] = {"global_keyprefix": self.prefix} if redis else {}
        self.settings: dict[str, Any] = {}
        """Settings every app made for this transport gets (``make_app``)."""

    async def cleanup(self) -> None:
        """Remove what the test left on the server: its prefixed Redis keys, its RabbitMQ queues."""
        if REDIS_URL in self.broker_url or REDIS_URL in self.backend_url:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(f"{REDIS_URL}/{self.redis_db}")
            try:
                keys = [key async for key in client.scan_iter(match=f"{self.prefix}*", count=1000)]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()
        if self.kind in ("amqp", "rpc"):
            from aqueue.broker.amqp import AMQPBroker

            async with AMQPBroker(AMQP_URL) as broker:
                for queue in (self.queue, f"{self.queue}-b"):
                    await broker.delete_queue(queue)
                await delete_exchanges(broker, f"ctl-{self.unique}.pidbox", f"reply.ctl-{self.unique}.pidbox")


@asynccontextmanager
async def transport_for(kind: str, tmp_path: Path, unique: str) -> AsyncIterator[Transport]:
    """A :class:`Transport` of ``kind``, cleaned up on the server afterwards."""
    transport = Transport(kind, tmp_path, unique)
    try:
        yield transport
    finally:
        await transport.cleanup()


async def delete_exchanges(broker: Any, *names: str) -> None:
    """Delete exchanges from RabbitMQ (those of remote control outlive their users)."""
    async with broker._scratch() as channel:
        for name in names:
            await channel.exchange_delete(name)


BROKER_KINDS = ["memory", "sqlite", "redis", "kombu", "amqp"]
"""``kombu``: Redis with kombu's list layout (``broker_transport_options={"layout": "kombu"}``)."""
BACKEND_KINDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=BROKER_KINDS)
async def broker_transport(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Transport]:
    async with transport_for(request.param, tmp_path, unique) as transport:
        yield transport


@pytest.fixture
async def broker(broker_transport: Transport) -> AsyncIterator[Broker]:
    """A connected broker of each kind, cleaned up after the test."""
    async with broker_from_url(broker_transport.broker_url, broker_transport.broker_options) as b:
        yield b
        await b.purge(broker_transport.queue)


@pytest.fixture(params=BACKEND_KINDS)
async def backend_transport(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Transport]:
    async with transport_for(request.param, tmp_path, unique) as transport:
        yield transport


@pytest.fixture
async def backend(backend_transport: Transport) -> AsyncIterator[ResultBackend]:
    """A connected result backend of each kind (rpc is tested with the AMQP broker)."""
    transport = backend_transport
    async with backend_from_url(transport.backend_url, expires=3600, options=transport.backend_options) as b:
        yield b


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


Factory = Callable[..., Any]


@pytest.fixture
async def make_app(unique: str) -> AsyncIterator[Callable[..., App]]:
    """Build ``App('tasks', ...)`` instances isolated to this test; every one is closed afterwards.

    ``make_app(transport, **settings)`` uses the transport's broker and backend URLs and options; without
    a transport the app uses ``memory://<unique>`` for both. The default queue, the control exchange and
    (for Redis) the key prefix are unique to the test, so apps made in one test share them and talk to
    each other, and nothing leaks into other tests. ``broker=``/``backend=`` and any setting override.
    """
    apps: list[App] = []

    def factory(transport: Transport | None = None, /, **settings: Any) -> App:
        options: dict[str, Any] = {
            "broker": f"memory://{unique}",
            "backend": f"memory://{unique}",
            "task_default_queue": f"q-{unique}",
            "control_exchange": f"ctl-{unique}",
            "result_expires": 600,
        }
        if transport is not None:
            options.update(
                broker=transport.broker_url,
                backend=transport.backend_url,
                task_default_queue=transport.queue,
                broker_transport_options=dict(transport.broker_options),
                result_backend_transport_options=dict(transport.backend_options),
                **transport.settings,
            )
        options.update(settings)
        app = App("tasks", **options)
        apps.append(app)
        return app

    yield factory
    for app in reversed(apps):
        await app.aclose()


# Redis and RabbitMQ helpers shared by the transport tests ----------------------------------------


@pytest.fixture
async def silent_url() -> AsyncIterator[str]:
    """A loopback server that accepts connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    server.close()
    await server.wait_closed()


@pytest.fixture
def prefix(unique: str) -> str:
    return f"t-{unique}:"


@pytest.fixture
async def raw(prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the same database; deletes every key of the test's prefix afterwards."""
    require_server("redis")
    client = aioredis.Redis.from_url(f"{REDIS_URL}/0")
    yield client
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, stderr.decode()


@pytest.fixture
async def vhost(unique: str) -> AsyncIterator[str]:
    """A vhost of its own, so that closing its connections touches no other test."""
    require_server("amqp")
    name = f"aqueue-test-{unique}"
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        await rabbitmqctl("delete_vhost", name)


# A private redis-server, for tests that stop, pause or restart it ------------------------------------


def reap(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    """Make sure ``proc`` is gone: ``signum``, then SIGKILL; always wait for it."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisServer:
    """A private ``redis-server`` on a spare loopback port, keeping nothing on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with (self.root / "redis-server.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {self.port} did not start:\n{self._log()}")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, and wait until the process has exited."""
        assert self.proc is not None
        self.proc.terminate()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {self.port} did not stop within {timeout}s")
            await asyncio.sleep(0.05)

    def reap(self) -> None:
        if self.proc is not None:
            reap(self.proc)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log(self) -> str:
        return (self.root / "redis-server.log").read_text(errors="replace")


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path)
    try:
        await server.start()
        yield server
    finally:
        server.reap()
