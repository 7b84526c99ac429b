"""The command line: ``python -m aqueue -A tasks worker --loglevel=info`` and friends.

``-A module`` or ``-A module:attr`` finds the App; it may stand before or after the command.
"""

from __future__ import annotations

from typing import Any

import click

from aqueue.cli._common import APP_HELP, load_app, run
from aqueue.cli.beat import beat
from aqueue.cli.control import control, inspect
from aqueue.cli.events import events
from aqueue.cli.tasks import call, purge, result
from aqueue.cli.worker import worker
from aqueue.exceptions import AqueueError

__all__ = ["cli", "load_app", "main", "run"]


class AppGroup(click.Group):
    """Turns aqueue errors into clean command-line errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AqueueError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=AppGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", metavar="APP", help=APP_HELP)
@click.version_option(package_name="aqueue", prog_name="aqueue")
@click.pass_context
def cli(ctx: click.Context, app_spec: str | None) -> None:
    """aqueue: an asyncio task queue with Celery's API.

    \b
    python -m aqueue -A tasks worker --loglevel=info
    python -m aqueue -A tasks beat --loglevel=info
    python -m aqueue -A tasks control rate_limit tasks.add 10/m
    python -m aqueue -A tasks call tasks.add --args '[4, 4]'
    python -m aqueue -A tasks events --dump
    """
    ctx.obj = {"app_spec": app_spec}


def main() -> None:
    """The ``aqueue`` console script and ``python -m aqueue``."""
    cli(prog_name="aqueue")


for command in (worker, beat, control, inspect, events, call, result, purge):
    cli.add_command(command)
