"""``worker --processes N``: one parent keeps N worker processes running, each with its own event loop.

The parent starts each child as ``python -m aqueue -A app worker ...`` in a process group of its own (a
Ctrl-C in the terminal reaches only the parent, which passes it on once), and holds one end of a socket
pair with it. Over that socket a child says ``ready`` once it consumes, and ``retiring`` when it has
reached ``--max-tasks-per-child`` or ``--max-memory-per-child``: the parent then starts its replacement at
once, while the old child finishes the tasks it holds and exits. A child whose socket reaches end of file
has lost its parent (killed outright): it shuts down gracefully.

A child that dies otherwise is replaced, at once if it had run for a while, else after a backoff that
doubles up to :data:`MAX_BACKOFF`. A child that fails before any child was ever ready stops the whole
worker (a configuration error would only fail again). SIGTERM or SIGINT is passed on to every child as
SIGTERM, and the parent exits 0 once all have stopped; a second SIGINT kills them and exits at once.

Child ``i`` of the worker ``name@host`` is named ``name-i@host`` (replacements keep the name) and also
answers remote control addressed to ``name@host``. Revoked task ids reach every child through one state
file (``--statedb``, or a temporary one for the parent's lifetime), so a replacement knows them too.
With metrics on, the children count and the parent serves one ``/metrics`` for all
(:mod:`aqueue.worker.supervised_metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aqueue.worker.shutdown import handle_signals
from aqueue.worker.worker import Worker, default_hostname

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["ChildWorker", "Supervisor", "child_hostname", "shared_statedb"]

logger = logging.getLogger("aqueue.worker")

STABLE = 30.0
"""Seconds after which a child that dies is replaced at once (and the backoff starts again)."""
MAX_BACKOFF = 30.0
MEMORY_CHECK = 1.0
"""Seconds between two looks at a child's resident memory."""

Command = Callable[[int, int], list[str]]
"""The command line of child ``index`` (from 1), which talks to its parent on file descriptor ``fd``."""


def child_hostname(hostname: str, index: int) -> str:
    """``w1@host`` -> ``w1-2@host`` for child 2: the name the child answers remote control and logs by."""
    name, at, host = hostname.partition("@")
    return f"{name}-{index}{at}{host}"


def describe_exit(code: int) -> str:
    """An exit status as Celery logs it: ``exitcode 1`` or ``signal 9 (SIGKILL)``."""
    if code >= 0:
        return f"exitcode {code}"
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"signal {-code}"


@contextmanager
def shared_statedb(statedb: str | None) -> Iterator[str]:
    """``statedb``, or a state file in a temporary folder removed afterwards, for the children to share."""
    if statedb:
        yield statedb
        return
    with tempfile.TemporaryDirectory(prefix="aqueue-worker-") as folder:
        yield str(Path(folder) / "revoked.json")


@dataclass(eq=False, slots=True)
class _Child:
    index: int
    process: asyncio.subprocess.Process
    channel: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    ready: bool = False
    retiring: bool = False

    def __str__(self) -> str:
        return f"Process 'Worker-{self.index}' pid:{self.process.pid}"

    def signal(self, signum: int) -> None:
        # Not Process.send_signal: subprocess polls first (waitpid), which reaps a child that has just
        # exited before asyncio's child watcher does; the watcher then reports exit code 255.
        # Until the watcher reaps it, the pid stays this child's (a zombie at worst).
        if self.process.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)


class Supervisor:
    """Keeps ``processes`` worker processes running until :meth:`request_stop`, then stops them all.

    Parameters:
        command: the command line of each child (see :data:`Command`).
        processes: how many children run at once.
        hostname: the worker's name, for the log.
        environment: variables added to this process's environment for every child.
        on_exit: called with the pid of each child that has exited, before it is replaced (an exception
            it raises is logged).
    """

    def __init__(
        self,
        command: Command,
        processes: int,
        hostname: str,
        *,
        environment: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.command, self.processes, self.hostname = command, processes, hostname
        self.environment = {**os.environ, **environment} if environment else None
        self.on_exit = on_exit
        self.children: set[_Child] = set()
        self.exit_code = 0
        self._stopping = asyncio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._streaks: Counter[int] = Counter()
        self._ever_ready = self._announced = False

    async def run(self) -> int:
        """Start the children and keep them running until asked to stop; returns the exit code."""
        with handle_signals(self, on_cold=self._kill):
            for index in range(1, self.processes + 1):
                if not self._stopping.is_set():
                    await self._start(index)
            await self._stopping.wait()
            while self._jobs:
                await asyncio.wait(set(self._jobs))
        logger.info("%s: all processes stopped.", self.hostname)
        return self.exit_code

    def request_stop(self) -> None:
        """Pass a warm shutdown on to every child (safe to call from a signal handler)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for child in self.children:
            child.signal(signal.SIGTERM)

    def _kill(self) -> None:
        for child in self.children:
            child.signal(signal.SIGKILL)

    async def _start(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command(index, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                process_group=0,
                env=self.environment,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        child = _Child(index, process, reader, writer, time.monotonic())
        self.children.add(child)
        if self._stopping.is_set():
            child.signal(signal.SIGTERM)
        self._spawn(self._watch(child))

    def _spawn(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _watch(self, child: _Child) -> None:
        try:
            async for line in child.channel:
                self._heard(child, line.strip())
            code = await child.process.wait()
        finally:
            child.writer.close()
        self.children.discard(child)
        self._report_exit(child)
        self._exited(child, code)

    def _report_exit(self, child: _Child) -> None:
        if self.on_exit is None:
            return
        try:
            self.on_exit(child.process.pid)
        except Exception:  # a failing hook must not keep the child from being replaced
            logger.exception("Cannot clean up after %s.", child)

    def _heard(self, child: _Child, word: bytes) -> None:
        if word == b"ready":
            child.ready = self._ever_ready = True
            live = sum(c.ready and not c.retiring for c in self.children)
            if live == self.processes and not self._announced:
                self._announced = True
                logger.info("%s: all %d processes ready.", self.hostname, self.processes)
        elif word == b"retiring" and not child.retiring:
            child.retiring = True
            if not self._stopping.is_set():
                logger.info("%s is being recycled; starting its replacement.", child)
                self._spawn(self._restart(child.index, 0.0))

    def _exited(self, child: _Child, code: int) -> None:
        cause = describe_exit(code)
        if self._stopping.is_set():
            # Killed by the SIGTERM passed on: it had no handler yet (starting) or any more (exiting).
            if code not in (0, -signal.SIGTERM):
                self.exit_code = 1
                logger.error("%s exited with %r during shutdown.", child, cause)
        elif child.retiring:
            (logger.info if code == 0 else logger.error)("%s exited with %r (recycled).", child, cause)
        elif not self._ever_ready:
            logger.critical("%s exited with %r before it was ready; stopping (see its log).", child, cause)
            self.exit_code = 1
            self.request_stop()
        else:
            delay = self._backoff(child.index, time.monotonic() - child.started)
            logger.error("%s exited with %r; starting a new one in %.1fs.", child, cause, delay)
            self._spawn(self._restart(child.index, delay))

    def _backoff(self, index: int, lived: float) -> float:
        if lived >= STABLE:
            self._streaks[index] = 0
            return 0.0
        self._streaks[index] += 1
        return min(MAX_BACKOFF, 2.0 ** (self._streaks[index] - 1))

    async def _restart(self, index: int, delay: float) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            try:
                await self._start(index)
                return
            except OSError as exc:
                delay = self._backoff(index, 0.0)
                logger.error("Cannot start a worker process: %s; trying again in %.1fs.", exc, delay)


class ChildWorker(Worker):
    """A worker process started by a :class:`Supervisor`: child ``index`` of ``hostname``.

    Parameters:
        index: the child's number, from 1; it names the child (:func:`child_hostname`).
        fd: the child's end of the socket pair shared with the parent.
        max_memory_kib: resident memory past which the child retires after a task.
        options: the other :class:`~aqueue.worker.Worker` options. With a ``metrics_port`` (or
            ``worker_metrics_port``) the child counts metrics and its parent serves them
            (:mod:`aqueue.worker.supervised_metrics`).
    """

    def __init__(
        self, app: App, *, index: int, fd: int, max_memory_kib: int | None = None, **options: Any
    ) -> None:
        group = options.pop("hostname", None) or default_hostname()
        super().__init__(app, hostname=child_hostname(group, index), **options)
        self.aliases = frozenset({group})
        if self.monitoring.metrics_port is not None:
            self.monitoring.metrics_port = None  # the parent serves every child's
            self.monitoring.count_metrics()
        self.fd, self.max_memory_kib = fd, max_memory_kib
        self._writer: asyncio.StreamWriter | None = None
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self.fd))
        self._watchers = [asyncio.create_task(self._watch_parent(reader))]
        if self.max_memory_kib is not None:
            self._watchers.append(asyncio.create_task(self._watch_memory(self.max_memory_kib)))
        await super().start()
        self._tell(b"ready")

    def retire(self, reason: str) -> None:
        super().retire(reason)
        if self._retiring:
            self._tell(b"retiring")

    async def stop(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await super().stop()
        if self._writer is not None:
            self._writer.close()

    def _tell(self, word: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(word + b"\n")

    async def _watch_parent(self, reader: asyncio.StreamReader) -> None:
        await reader.read()
        logger.warning("%s: the parent process is gone: warm shutdown.", self.hostname)
        self.request_stop()

    async def _watch_memory(self, limit: int) -> None:
        if (used := rss_kib()) > limit:
            logger.warning(
                "%s uses %d KiB at start, over the max memory per child (%d KiB): it is replaced after "
                "every task.",
                self.hostname,
                used,
                limit,
            )
        while (used := rss_kib()) <= limit or not self.state.total:
            await asyncio.sleep(MEMORY_CHECK)
        self.retire(f"its memory ({used} KiB) is over the max memory per child ({limit} KiB)")


def rss_kib() -> int:
    """This process's resident memory in KiB (on systems without ``/proc``, its peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        import resource  # not on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak
