"""Private Redis deployments for tests: a Sentinel set and a Cluster, on free loopback ports.

Each server runs from a temporary directory of its own, keeps nothing on disk it does not need, and
is stopped (SIGTERM, then SIGKILL) when the ``async with`` (Sentinel) or ``with`` (Cluster) block ends,
whatever happened inside. Every
wait has a timeout, and a server that does not come up fails the test showing its log.

- :func:`sentinel_set`: a master, a replica and three sentinels monitoring ``mymaster``; the
  master and replica require a password, and so do the sentinels (given to clients in
  ``sentinel_kwargs``). :meth:`SentinelSet.failover` runs ``SENTINEL FAILOVER`` and waits until every
  sentinel names the new master and the old one replicates from it; :meth:`SentinelSet.crash_master`
  kills the master and waits for the sentinels to promote the replica.
- :func:`redis_cluster`: three masters joined by ``redis-cli --cluster create`` (ports whose cluster
  bus port, 10,000 higher, is free too); synchronous, so one cluster can serve a whole module.
- :func:`suite_of`: another module's tests, to run them unchanged on one of these deployments, with
  :func:`transport_on` giving the ``transport`` they take.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import CI, Transport

__all__ = [
    "Cluster",
    "RedisProcess",
    "SentinelSet",
    "redis_cluster",
    "require_redis_server",
    "sentinel_set",
    "sentinel_set_sync",
    "suite_of",
    "transport_on",
]

MASTER_NAME = "mymaster"
MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"


def suite_of(module: Any, *fixtures: str) -> dict[str, Callable[..., Any]]:
    """The test functions of ``module`` that take one of ``fixtures``.

    A test module puts them in its globals, and defines those fixtures for its deployment, to run
    another suite unchanged on it (``globals().update(suite_of(test_tour, "app"))``).
    """
    found: dict[str, Callable[..., Any]] = {}
    for name, function in vars(module).items():
        if not name.startswith("test_") or not inspect.isfunction(function):
            continue
        if set(inspect.signature(function).parameters) & set(fixtures):
            found[name] = function
    return found


def transport_on(url: str, options: dict[str, Any], tmp_path: Path, unique: str) -> Transport:
    """A transport for the tour's and the contract's tests on a deployment: ``url`` for the broker and
    the backend, ``options`` for both, plus the test's own key prefix."""
    transport = Transport("memory", tmp_path, unique)
    transport.broker_url = transport.backend_url = url
    transport.broker_options = dict(options, global_keyprefix=transport.prefix)
    transport.backend_options = dict(options, global_keyprefix=transport.prefix)
    return transport


def require_redis_server() -> None:
    """Fail under CI, else skip, when ``redis-server`` (and ``redis-cli``) are not installed."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        message = "redis-server and redis-cli are not installed (apt-get install redis-server)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)


async def command(client: aioredis.Redis, *args: Any) -> Any:
    """A raw command (redis-py's ``execute_command`` is untyped)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too, both under 65,536."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisProcess:
    """One ``redis-server`` (or sentinel) process run from a config file in ``root``."""

    def __init__(
        self,
        root: Path,
        config: str,
        *,
        sentinel: bool = False,
        password: str | None = None,
        cluster: bool = False,
    ) -> None:
        self.root, self.password, self.sentinel = root, password, sentinel
        self.port = free_cluster_port() if cluster else free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / ("sentinel.conf" if sentinel else "redis.conf")
        self.config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {root}\n{config}")
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["redis-server", str(self.config), *(["--sentinel"] if self.sentinel else [])]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self._answers():
            if (self.proc is not None and self.proc.poll() is not None) or time.monotonic() > deadline:
                pytest.fail(
                    f"redis on port {self.port} did not start:\n{self.log.read_text(errors='replace')}"
                )
            await asyncio.sleep(0.05)

    def wait_ready_sync(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._answers_sync():
            if (self.proc is not None and self.proc.poll() is not None) or time.monotonic() > deadline:
                pytest.fail(
                    f"redis on port {self.port} did not start:\n{self.log.read_text(errors='replace')}"
                )
            time.sleep(0.05)

    def _answers_sync(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A plain client of this server (closed by the caller)."""
        kwargs.setdefault("socket_timeout", 5)
        return aioredis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past 5 s; always waits for the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    async def _answers(self) -> bool:
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()


@dataclass
class SentinelSet:
    """A master, a replica and three sentinels; ``url`` and ``options`` are what an app is given."""

    servers: list[RedisProcess]
    sentinels: list[RedisProcess]
    options: dict[str, Any] = field(default_factory=dict)

    def url(self, db: int = 0, password: str = MASTER_PASSWORD) -> str:
        """Celery's form: ``sentinel://:pw@host:port;...;sentinel://:pw@host:port/db``."""
        auth = f":{password}@" if password else ""
        parts = [f"sentinel://{auth}127.0.0.1:{s.port}" for s in self.sentinels]
        return ";".join(parts) + f"/{db}"

    async def master(self) -> RedisProcess:
        """The server every sentinel names as the master now."""
        ports = {await self._named_master(s) for s in self.sentinels}
        assert len(ports) == 1, f"the sentinels disagree on the master: {ports}"
        port = ports.pop()
        return next(s for s in self.servers if s.port == port)

    async def failover(self, timeout: float = 30.0, *, follow: bool = True) -> RedisProcess:
        """``SENTINEL FAILOVER``; returns the new master once every sentinel names it, and (``follow``)
        the old one replicates from it, which the sentinels take 10 to 20 s to arrange."""
        old = await self.master()
        new = next(s for s in self.servers if s is not old)
        deadline = time.monotonic() + timeout
        # A sentinel refuses (NOGOODSLAVE) while its INFO of the replica is over 5 s old (it asks every
        # 10 s): ask each in turn, one of them usually has fresh INFO.
        for attempt in itertools.count():
            client = self.sentinels[
                (attempt + 1) % len(self.sentinels)
            ].client()  # not the first, which clients ask first
            try:
                await command(client, "SENTINEL", "FAILOVER", MASTER_NAME)
                break
            except aioredis.ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
            finally:
                await client.aclose()
            await asyncio.sleep(0.05)
        while not await self._settled(new, old if follow else None):
            if time.monotonic() > deadline:
                pytest.fail(f"the failover to port {new.port} did not complete within {timeout}s")
            await asyncio.sleep(0.1)
        return new

    async def start(self, timeout: float = 30.0) -> None:
        """Start the servers, then (once the replica has synced) the sentinels; wait until all see all.

        The replica syncs before the sentinels start, so their first INFO of the master lists it (else
        they learn of it only at the next one, 10 s later).
        """
        replica = self.servers[1]
        for server in self.servers:
            server.start()
        for server in self.servers:
            await server.wait_ready()
        deadline = time.monotonic() + timeout
        while not await self._replicating(replica):
            if time.monotonic() > deadline:
                pytest.fail(f"the replica did not sync:\n{replica.log.read_text(errors='replace')}")
            await asyncio.sleep(0.05)
        for server in self.sentinels:
            server.start()
        for server in self.sentinels:
            await server.wait_ready()
        await self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop every server and sentinel (SIGTERM, then SIGKILL)."""
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    async def crash_master(self, timeout: float = 30.0) -> RedisProcess:
        """SIGKILL the master; returns the replica once every sentinel names it the master."""
        old = await self.master()
        new = next(s for s in self.servers if s is not old)
        assert old.proc is not None
        old.proc.kill()
        old.proc.wait(5)
        deadline = time.monotonic() + timeout
        while not await self._settled(new, None):
            if time.monotonic() > deadline:
                pytest.fail(f"the sentinels did not promote port {new.port} within {timeout}s")
            await asyncio.sleep(0.1)
        return new

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the replica has synced with the master, and every sentinel knows it and the other two."""
        deadline = time.monotonic() + timeout
        while not await self._replicating(self.servers[1]) or not all(
            [await self._sees_everything(s) for s in self.sentinels]
        ):
            if time.monotonic() > deadline:
                logs = "\n".join(s.log.read_text(errors="replace")[-2000:] for s in self.sentinels)
                pytest.fail(f"the sentinels did not see each other within {timeout}s:\n{logs}")
            await asyncio.sleep(0.1)

    async def _named_master(self, sentinel: RedisProcess) -> int:
        client = sentinel.client()
        try:
            _, port = await command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            return int(port)
        finally:
            await client.aclose()

    async def _sees_everything(self, sentinel: RedisProcess) -> bool:
        client = sentinel.client(decode_responses=True)
        try:
            masters: Any = await client.sentinel_masters()
            state = masters[MASTER_NAME]
            return bool(state["num-slaves"] >= 1 and state["num-other-sentinels"] >= 2)
        except Exception:
            return False
        finally:
            await client.aclose()

    async def _settled(self, new: RedisProcess, old: RedisProcess | None) -> bool:
        if any([await self._named_master(s) != new.port for s in self.sentinels]):
            return False
        return old is None or await self._replicating(old)

    async def _replicating(self, replica: RedisProcess) -> bool:
        client = replica.client(decode_responses=True)
        try:
            info = await client.info("replication")
            return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")
        except Exception:
            return False
        finally:
            await client.aclose()


@asynccontextmanager
async def sentinel_set(root: Path) -> AsyncIterator[SentinelSet]:
    """Start a master, a replica and three sentinels under ``root``; stop them all afterwards."""
    deployment = _sentinel_deployment(root)
    try:
        await deployment.start()
        yield deployment
    finally:
        deployment.stop()


@contextmanager
def sentinel_set_sync(root: Path) -> Iterator[SentinelSet]:
    """:func:`sentinel_set` from synchronous code, so that one deployment can serve a whole module."""
    deployment = _sentinel_deployment(root)
    try:
        asyncio.run(deployment.start())
        yield deployment
    finally:
        deployment.stop()


def _sentinel_deployment(root: Path) -> SentinelSet:
    require_redis_server()
    auth = f"requirepass {MASTER_PASSWORD}\nmasterauth {MASTER_PASSWORD}\nsave ''\nappendonly no\n"
    auth += "repl-diskless-sync-delay 0\n"  # the replica's first sync at once, not 5 s later
    master = RedisProcess(root / "master", auth, password=MASTER_PASSWORD)
    replica = RedisProcess(
        root / "replica", auth + f"replicaof 127.0.0.1 {master.port}\n", password=MASTER_PASSWORD
    )
    monitor = (
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 2\n"
        f"sentinel auth-pass {MASTER_NAME} {MASTER_PASSWORD}\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 2000\n"
        f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
    )
    sentinels = [
        RedisProcess(root / f"sentinel-{i}", monitor, sentinel=True, password=SENTINEL_PASSWORD)
        for i in range(3)
    ]
    options = {"master_name": MASTER_NAME, "sentinel_kwargs": {"password": SENTINEL_PASSWORD}}
    return SentinelSet([master, replica], sentinels, options)


@dataclass
class Cluster:
    """Three cluster masters; ``url`` names one of them, as a client's seed."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"


@contextmanager
def redis_cluster(root: Path, timeout: float = 30.0) -> Iterator[Cluster]:
    """Start three masters under ``root`` and join them into a cluster; stop them afterwards.

    Synchronous, so that one cluster can serve a whole module whatever event loop its tests run in.
    """
    require_redis_server()
    config = "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 5000\nsave ''\nappendonly no\n"
    nodes = [RedisProcess(root / f"node-{i}", config, cluster=True) for i in range(3)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready_sync(timeout)
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        argv = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        created = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        output = (created.stdout + created.stderr).decode(errors="replace")
        assert created.returncode == 0, output
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(node) for node in nodes):
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster did not become ok within {timeout}s:\n{output}")
            time.sleep(0.1)
        yield Cluster(nodes)
    finally:
        for node in nodes:
            node.stop()


def _cluster_ok(node: RedisProcess) -> bool:
    client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2, decode_responses=True)
    try:
        return bool(client.cluster("info").get("cluster_state") == "ok")
    except redis.RedisError:
        return False
    finally:
        client.close()
