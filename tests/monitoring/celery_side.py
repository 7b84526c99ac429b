"""Real Celery and Flower processes on a test's broker: a Celery app module for them, and their clean-up.

Both sides of a test keep apart from other tests by names: on Redis a key prefix (Celery's
``global_keyprefix`` prefixes its pub/sub channels too), on RabbitMQ exchanges and queues named after the
test, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import aqueue
from tests.conftest import AMQP_URL, Transport, delete_exchanges

__all__ = ["CeleryProcess", "celery_settings", "delete_amqp_exchanges", "free_port", "write_celery_app"]

CELERY_APP = """
import json
from celery import Celery

settings = json.loads({settings!r})
app = Celery("celery_side", broker=settings.pop("broker_url"))
app.conf.update(settings)
"""


def aqueue_settings(transport: Transport, unique: str) -> dict[str, Any]:
    """What an aqueue app of the test sets, besides ``make_app``'s, so Celery's side can match it."""
    return {"event_exchange": f"celeryev-{unique}"}


def celery_settings(transport: Transport, unique: str) -> dict[str, Any]:
    """Celery settings matching ``make_app(transport, **aqueue_settings(...))``."""
    settings: dict[str, Any] = {
        "broker_url": transport.broker_url,
        "control_exchange": f"ctl-{unique}",
        "event_exchange": f"celeryev-{unique}",
        "task_default_queue": transport.queue,
        "broker_connection_retry_on_startup": True,
    }
    if transport.kind == "redis":
        settings["broker_transport_options"] = {"global_keyprefix": transport.prefix}
    return settings


def write_celery_app(folder: Path, settings: dict[str, Any]) -> None:
    """``celery_side.py`` in ``folder``: a Celery app with ``settings``, for ``celery -A celery_side``."""
    (folder / "celery_side.py").write_text(CELERY_APP.format(settings=json.dumps(settings)))


def celery_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "AQUEUE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(Path(aqueue.__file__).resolve().parent.parent)])
    env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CeleryProcess:
    """A ``celery``/``python`` subprocess in ``folder``; its output read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, stop_signal: int = signal.SIGTERM) -> None:
        self.proc, self.lines, self.stop_signal = proc, list[str](), stop_signal
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, folder: Path, *argv: str, stop_signal: int = signal.SIGTERM) -> CeleryProcess:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=folder,
            env=celery_env(folder),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc, stop_signal)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, text: str, timeout: float = 30.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not any(text in line for line in self.lines):
                    if self.proc.returncode is not None:
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        if not any(text in line for line in self.lines):
            pytest.fail(f"{text!r} did not appear within {timeout}s:\n{self.output}")

    async def finish(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself; fail (killing it) past ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self.proc.wait()
                await self._reader
        except TimeoutError:
            await self.stop()
            pytest.fail(f"the process did not finish within {timeout}s:\n{self.output}")
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def stop(self) -> None:
        """The stop signal (SIGTERM), then SIGKILL; always reaped."""
        if self.proc.returncode is None:
            self.proc.send_signal(self.stop_signal)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()


@asynccontextmanager
async def running(
    folder: Path, *argv: str, stop_signal: int = signal.SIGTERM
) -> AsyncIterator[CeleryProcess]:
    process = await CeleryProcess.start(folder, *argv, stop_signal=stop_signal)
    try:
        yield process
    finally:
        await process.stop()


async def run_celery(folder: Path, *args: str, timeout: float = 60.0) -> tuple[int, str]:
    """``celery -A celery_side ARGS``: its exit code and output."""
    process = await CeleryProcess.start(folder, sys.executable, "-m", "celery", "-A", "celery_side", *args)
    code = await process.finish(timeout)
    return code, process.output


async def delete_amqp_exchanges(unique: str) -> None:
    """Delete the event exchange a test named after ``unique`` from RabbitMQ (the transport deletes the rest)."""
    from aqueue.broker.amqp import AMQPBroker

    async with AMQPBroker(AMQP_URL) as broker:
        await delete_exchanges(broker, f"celeryev-{unique}")
