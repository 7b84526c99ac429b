"""What the commands share: finding the App, running a coroutine, the -A option."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from aqueue.app import App

__all__ = ["APP_HELP", "LEVELS", "app_option", "app_spec_of", "get_app", "load_app", "loglevel_option", "run"]

T = TypeVar("T")

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")
APP_HELP = "The app: a module holding an App ('tasks'), or module:attribute ('proj.tasks:app')."


def load_app(spec: str) -> App:
    """Import ``module`` or ``module:attr`` (the working directory is importable) and return the App."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"Cannot import {module_name!r} given with -A/--app: {exc}") from exc
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, App):
            raise click.UsageError(f"{spec!r} is not an App (found {type(found).__name__}).")
        return found
    for name in ("app", "celery"):
        if isinstance(getattr(module, name, None), App):
            return getattr(module, name)  # type: ignore[no-any-return]
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if len(apps) == 1:
        return apps[0]
    raise click.UsageError(
        f"Module {module_name!r} has {'no' if not apps else 'several'} App instances: name one with -A {module_name}:app"
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def app_option(fn: Any) -> Any:
    """The ``-A/--app`` option again on a command, so ``worker -A tasks`` works too."""
    return click.option("-A", "--app", "app_spec", metavar="APP", help=APP_HELP)(fn)


loglevel_option = click.option(
    "-l",
    "--loglevel",
    default="WARNING",
    show_default=True,
    metavar="LEVEL",
    type=click.Choice(LEVELS, case_sensitive=False),
    help="Logging level.",
)
"""The ``-l/--loglevel`` option of the commands that run until stopped (worker, beat)."""


def get_app(ctx: click.Context, app_spec: str | None) -> App:
    return load_app(app_spec_of(ctx, app_spec))


def app_spec_of(ctx: click.Context, app_spec: str | None) -> str:
    """The ``-A`` value, given after the command or before it."""
    spec = app_spec or (ctx.obj or {}).get("app_spec")
    if not spec:
        raise click.UsageError("Which app? Give it with -A/--app, e.g. python -m aqueue -A tasks worker")
    return str(spec)
