"""``aqueue beat``: send the app's periodic tasks when they are due, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime

import click

from aqueue import __version__
from aqueue.app import App
from aqueue.beat import Beat
from aqueue.cli._common import app_option, get_app, loglevel_option, run
from aqueue.cli.worker import _setup_logging
from aqueue.urls import mask_password

__all__ = ["beat"]


@click.command()
@app_option
@loglevel_option
@click.option("-f", "--logfile", type=click.Path(dir_okay=False), help="Log to this file instead of stderr.")
@click.option(
    "--max-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Longest sleep between looks at the schedule (default: beat_max_loop_interval, 300).",
)
@click.option(
    "-s",
    "--schedule",
    "schedule_file",
    metavar="FILE",
    help="Accepted for Celery compatibility and unused: beat keeps its state on the broker.",
)
@click.pass_context
def beat(
    ctx: click.Context,
    app_spec: str | None,
    loglevel: str,
    logfile: str | None,
    max_interval: float | None,
    schedule_file: str | None,
) -> None:
    """Start the periodic task scheduler: send each beat_schedule entry when it is due.

    Any number of beats may run against one broker: each due time is sent once.

    \b
    python -m aqueue -A tasks beat --loglevel=info
    python -m aqueue -A tasks worker -B      (a worker with a beat inside)
    """
    app = get_app(ctx, app_spec)
    _setup_logging(loglevel, logfile)
    scheduler = Beat(app, max_interval=max_interval)
    click.echo(_banner(app, scheduler, loglevel, logfile), err=True)
    run(_serve(app, scheduler))


async def _serve(app: App, scheduler: Beat) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, scheduler.request_stop)
    try:
        await scheduler.run()
    finally:
        await app.aclose()


def _banner(app: App, scheduler: Beat, loglevel: str, logfile: str | None) -> str:
    return "\n".join(
        [
            f"aqueue beat v{__version__} is starting.",
            f"LocalTime -> {datetime.now().astimezone():%Y-%m-%d %H:%M:%S}",
            "Configuration ->",
            f"    . broker -> {mask_password(app.broker_url)}",
            "    . scheduler -> aqueue.beat.Beat (state on the broker)",
            f"    . logfile -> {logfile or '[stderr]'}@%{loglevel.upper()}",
            f"    . maxinterval -> {scheduler.max_interval:g}s",
        ]
    )
