"""``aqueue worker``: run a worker in this process until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

import click

from aqueue.app import App
from aqueue.cli._common import app_option, get_app, run
from aqueue.worker.banner import banner
from aqueue.worker.shutdown import handle_signals
from aqueue.worker.worker import Worker, default_hostname

__all__ = ["worker"]

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")


@click.command()
@app_option
@click.option(
    "-l",
    "--loglevel",
    default="WARNING",
    show_default=True,
    metavar="LEVEL",
    type=click.Choice(LEVELS, case_sensitive=False),
    help="Logging level.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help="Tasks run at once (default: worker_concurrency, 100).",
)
@click.option("-Q", "--queues", metavar="Q1,Q2", help="Comma-separated queues to consume (default: celery).")
@click.option(
    "-n", "--hostname", metavar="NAME", help="The worker's name, used verbatim (default: aqueue@<host>)."
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
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (worker_metrics_port; off by default).",
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
    task_events: bool | None,
    metrics_port: int | None,
) -> None:
    """Start a worker: consume tasks and run them until SIGTERM or SIGINT (Ctrl-C).

    \b
    python -m aqueue -A tasks worker --loglevel=info
    python -m aqueue -A tasks worker -Q low-priority -c 50 -n w1@example
    python -m aqueue -A tasks worker -E --metrics-port 9808
    """
    app = get_app(ctx, app_spec)
    _setup_logging(loglevel, logfile)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    w = Worker(
        app,
        concurrency=concurrency,
        queues=names,
        hostname=hostname or default_hostname(),
        prefetch_multiplier=prefetch_multiplier,
        shutdown_timeout=shutdown_timeout,
        statedb=statedb,
        send_events=task_events,
        metrics_port=metrics_port,
    )
    with _pidfile(pidfile):
        text = banner(
            app, hostname=w.hostname, concurrency=w.concurrency, queues=w.queues, task_events=w.send_events
        )
        click.echo(text, err=True)
        run(_serve(app, w))


async def _serve(app: App, w: Worker) -> None:
    try:
        with handle_signals(w):
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
