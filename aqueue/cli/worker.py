"""``aqueue worker``: run a worker in this process, or ``--processes N`` under it, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

import click

from aqueue.app import App
from aqueue.beat import Beat
from aqueue.cli._common import app_option, app_spec_of, get_app, loglevel_option, run
from aqueue.worker.banner import banner
from aqueue.worker.shutdown import handle_signals
from aqueue.worker.supervisor import ChildWorker, Command, Supervisor, shared_statedb
from aqueue.worker.worker import Worker, default_hostname

__all__ = ["worker"]

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


@click.command()
@app_option
@loglevel_option
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help="Tasks run at once by each worker process, as asyncio tasks (default: worker_concurrency, 100). "
    "Not a process count as on Celery's prefork pool: that is --processes.",
)
@click.option("-Q", "--queues", metavar="Q1,Q2", help="Comma-separated queues to consume (default: celery).")
@click.option(
    "-n",
    "--hostname",
    metavar="NAME",
    help="The worker's name, used verbatim (default: aqueue@<host>). With --processes, process i is "
    "NAME-i@HOST, and answers control for NAME@HOST too.",
)
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False),
    help="Write the pid here; refuse to start if a live worker holds it.",
)
@click.option("-f", "--logfile", type=click.Path(dir_okay=False), help="Log to this file instead of stderr.")
@click.option(
    "-S",
    "--statedb",
    type=click.Path(dir_okay=False),
    help="Keep revoked task ids in this file across restarts.",
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=1),
    metavar="N",
    help="Unacknowledged messages held = concurrency x N (default 4).",
)
@click.option(
    "--shutdown-timeout",
    type=float,
    metavar="SECONDS",
    help="Grace period for running tasks on shutdown (default 10).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    metavar="N",
    help="Run N worker processes, each with its own event loop and -c slots, under one parent that "
    "restarts any that dies (default: worker_processes; none: this one process).",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    metavar="N",
    help="Replace a worker process once it has taken N tasks; they all finish first "
    "(default: worker_max_tasks_per_child). Without --processes, runs one supervised process.",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    metavar="KIB",
    help="Replace a worker process after a task once its resident memory exceeds KIB kibibytes "
    "(default: worker_max_memory_per_child). Without --processes, runs one supervised process.",
)
@click.option("--supervised-child", type=(int, int), hidden=True, metavar="INDEX FD")
@click.option(
    "-B", "--beat", "with_beat", is_flag=True, help="Also send periodic tasks (run beat in the worker)."
)
@click.option(
    "-E",
    "--task-events",
    "task_events",
    is_flag=True,
    default=None,
    help="Send Celery's task events, for Flower and 'events' (worker_send_task_events).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (worker_metrics_port; off by default). "
    "With --processes, the parent serves one endpoint adding up every process.",
)
@click.pass_context
def worker(
    ctx: click.Context,
    app_spec: str | None,
    loglevel: str,
    concurrency: int | None,
    queues: str | None,
    hostname: str | None,
    pidfile: str | None,
    logfile: str | None,
    statedb: str | None,
    prefetch_multiplier: int | None,
    shutdown_timeout: float | None,
    processes: int | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    supervised_child: tuple[int, int] | None,
    with_beat: bool,
    task_events: bool | None,
    metrics_port: int | None,
) -> None:
    """Start a worker: consume tasks and run them until SIGTERM or SIGINT (Ctrl-C).

    \b
    python -m aqueue -A tasks worker --loglevel=info
    python -m aqueue -A tasks worker -Q low-priority -c 50 -n w1@example
    python -m aqueue -A tasks worker --processes 4 -c 100 --max-tasks-per-child 10000
    python -m aqueue -A tasks worker -B      (also sends periodic tasks)
    python -m aqueue -A tasks worker -E --metrics-port 9808
    """
    app = get_app(ctx, app_spec)
    _setup_logging(loglevel, logfile)
    conf = app.conf
    options: dict[str, Any] = {
        "concurrency": concurrency,
        "queues": [q.strip() for q in queues.split(",") if q.strip()] if queues else None,
        "prefetch_multiplier": prefetch_multiplier,
        "shutdown_timeout": shutdown_timeout,
        "statedb": statedb,
        "max_tasks": max_tasks_per_child or conf.worker_max_tasks_per_child,
        "send_events": task_events,
        "metrics_port": metrics_port,
    }
    max_memory = max_memory_per_child or conf.worker_max_memory_per_child
    if supervised_child is not None:
        index, fd = supervised_child
        multiprocessing.current_process().name = f"Worker-{index}"
        child = ChildWorker(app, index=index, fd=fd, max_memory_kib=max_memory, hostname=hostname, **options)
        run(_serve(app, child, Beat(app) if with_beat else nullcontext()))
        return
    processes = processes or conf.worker_processes
    if processes is None and (options["max_tasks"] or max_memory):
        processes = 1
    w = Worker(app, hostname=hostname or default_hostname(), **options)
    with _pidfile(pidfile):
        text = banner(
            app,
            hostname=w.hostname,
            concurrency=w.concurrency,
            queues=w.queues,
            processes=processes,
            task_events=w.send_events,
        )
        click.echo(text, err=True)
        if processes is None:
            run(_serve(app, w, Beat(app) if with_beat else nullcontext()))
            return
        with shared_statedb(statedb or conf.worker_state_db) as state:
            command = _child_command(ctx, w.hostname, state, with_beat)
            port = conf.worker_metrics_port if metrics_port is None else metrics_port
            code = asyncio.run(_supervise(command, processes, w.hostname, port, conf.worker_metrics_address))
    ctx.exit(code)


async def _supervise(
    command: Command, processes: int, hostname: str, metrics_port: int | None, address: str
) -> int:
    """Run the children; with ``metrics_port``, serve one ``/metrics`` adding up all of theirs."""
    if metrics_port is None:
        return await Supervisor(command, processes, hostname).run()
    from aqueue.worker.supervised_metrics import SupervisedMetrics  # needs the prometheus extra

    async with SupervisedMetrics(metrics_port, address) as metrics:
        supervisor = Supervisor(
            command, processes, hostname, environment=metrics.environment, on_exit=metrics.process_exited
        )
        return await supervisor.run()


_FORWARDED = (
    "loglevel",
    "concurrency",
    "queues",
    "logfile",
    "prefetch_multiplier",
    "shutdown_timeout",
    "max_tasks_per_child",
    "max_memory_per_child",
    "metrics_port",
)
"""The options a parent passes on to its worker processes as given (they read the same settings)."""


def _child_command(ctx: click.Context, hostname: str, statedb: str, with_beat: bool) -> Command:
    """The command of worker process ``index``; with ``-B`` the first one also runs beat."""
    spec = app_spec_of(ctx, ctx.params["app_spec"])
    argv = [sys.executable, "-m", "aqueue", "-A", spec, "worker", "-n", hostname, "--statedb", statedb]
    for name in _FORWARDED:
        if ctx.params[name] is not None:
            argv += [f"--{name.replace('_', '-')}", str(ctx.params[name])]
    if ctx.params["task_events"]:
        argv.append("-E")
    return lambda index, fd: [
        *argv,
        *(["-B"] if with_beat and index == 1 else []),
        "--supervised-child",
        str(index),
        str(fd),
    ]


async def _serve(app: App, w: Worker, beat: AbstractAsyncContextManager[object]) -> None:
    try:
        with handle_signals(w):
            async with beat:
                await w.run()
    finally:
        await app.aclose()


def _setup_logging(level: str, logfile: str | None) -> None:
    try:
        handler: logging.Handler = (
            logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
        )
    except OSError as exc:
        raise click.ClickException(f"Cannot open the log file {logfile}: {exc.strerror}") from exc
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper().replace("FATAL", "CRITICAL"))


@contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    """Hold ``path`` for this worker: it holds our pid and an exclusive lock while we run.

    The lock (``flock``) is what makes it exclusive, so two workers started at the same instant cannot
    both start, and a file left by a crashed worker (nobody holds its lock) is simply taken over.
    """
    if path is None:
        yield
        return
    pidfile = Path(path)
    fd = _claim(pidfile)
    try:
        yield
    finally:
        try:
            if _same_file(fd, pidfile):
                pidfile.unlink()
        except OSError:
            pass
        os.close(fd)


def _claim(pidfile: Path) -> int:
    """Open, lock and fill ``pidfile``; the lock lasts while the returned descriptor is open."""
    if fcntl is None:
        raise click.ClickException("--pidfile needs a POSIX system (file locks).")
    for _ in range(3):
        try:
            fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise click.ClickException(f"Cannot create the pidfile {pidfile}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            held = f"holds pid {other}, a worker" if other else "is held by a worker"
            raise click.ClickException(
                f"Pidfile {pidfile} {held} that is still running. Stop it first, or use another --pidfile."
            ) from None
        if not _same_file(fd, pidfile):
            os.close(fd)  # its worker removed it between our open and our lock: open the new one
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise click.ClickException(f"Cannot take the pidfile {pidfile}: it keeps being replaced.")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
