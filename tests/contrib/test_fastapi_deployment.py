"""A real deployment on Redis: uvicorn in one process, `python -m aqueue worker` in another.

1,000 concurrent HTTP requests each await their task's result; every answer is right, and the web
process holds a small, bounded number of Redis connections throughout (counted with CLIENT LIST,
matched to the web process's own sockets).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL, require_server

EXAMPLES = Path(__file__).parents[2] / "examples"
REQUESTS = 1_000
POOL = 4
CONNECTION_BOUND = POOL + 3  # the broker's pool and its publishing line, the result backend's two

DEPLOY = """
import sys
sys.path.insert(0, {examples!r})
from fastapi_app import api, app

app.conf.update(
    broker_transport_options={{"global_keyprefix": {prefix!r}, "max_connections": {pool}}},
    task_default_queue={queue!r},
    control_exchange={queue!r},
    result_expires=120,
)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_ports_of(pid: int) -> set[int]:
    """Local ports of ``pid``'s TCP connections to port 6379, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == 6379:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def web_connections(client: aioredis.Redis, pid: int) -> int:
    """How many of CLIENT LIST's connections belong to the web process."""
    ports = redis_ports_of(pid)
    clients = await client.client_list()
    return sum(1 for c in clients if int(str(c["addr"]).rsplit(":", 1)[1]) in ports)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], str]]:
    require_server("redis")
    unique = uuid.uuid4().hex[:10]
    prefix, queue = f"deploy{unique}:", f"deploy-{unique}"
    (tmp_path / "deploy.py").write_text(
        DEPLOY.format(examples=str(EXAMPLES), prefix=prefix, queue=queue, pool=POOL)
    )
    env = {**os.environ, "AQUEUE_BROKER_URL": f"{REDIS_URL}/0", "AQUEUE_RESULT_BACKEND": f"{REDIS_URL}/0"}
    env.pop("EMBED_WORKER", None)
    yield tmp_path, env, prefix


@pytest.fixture
async def redis_client(deployment: tuple[Path, dict[str, str], str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"{REDIS_URL}/0")
    yield client
    prefix = deployment[2]
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
async def test_thousand_concurrent_requests_on_uvicorn_and_a_worker_process(
    deployment: tuple[Path, dict[str, str], str], redis_client: aioredis.Redis
) -> None:
    folder, env, _ = deployment
    port = free_port()
    # Given uvicorn serving the example (no embedded worker) and a worker in its own process
    web = start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "deploy:api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        folder,
        env,
        folder / "web.log",
    )
    worker = start(
        [sys.executable, "-m", "aqueue", "-A", "deploy:app", "worker", "-c", "200", "-l", "warning"],
        folder,
        env,
        folder / "worker.log",
    )
    try:
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        if (await http.get("/tasks/warm-up")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, await web_connections(redis_client, web.pid))
                    await anyio.sleep(0.05)

            # When 1,000 clients each post a sum and wait for its result, all at once
            async def one(i: int) -> tuple[int, int]:
                response = await http.post("/add/wait", params={"timeout": 60}, json={"x": i, "y": i})
                assert response.status_code == 200, response.text
                return i, response.json()["result"]

            with anyio.fail_after(120):
                watcher = asyncio.ensure_future(watch())
                try:
                    answers = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
                finally:
                    watcher.cancel()
            after = await web_connections(redis_client, web.pid)
    finally:
        stop(web)
        stop(worker)
    # Then every answer is right
    assert sorted(answers) == [(i, 2 * i) for i in range(REQUESTS)]
    # And the web process never held more than a small bounded number of Redis connections
    print(f"web process: peak {peak} Redis connections, {after} after")
    assert 1 <= peak <= CONNECTION_BOUND, (peak, (folder / "web.log").read_text()[-2000:])
    assert after <= CONNECTION_BOUND
    assert worker.returncode == 0, (folder / "worker.log").read_text()[-2000:]
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is its clean exit
    assert web.returncode in (0, -signal.SIGTERM), (folder / "web.log").read_text()[-2000:]
    assert "Traceback" not in (folder / "web.log").read_text()
