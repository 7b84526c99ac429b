"""``aqueue control`` and ``aqueue inspect``: commands to live workers, replies printed as Celery's."""

from __future__ import annotations

import json
from typing import Any

import click

from aqueue.app import App
from aqueue.cli._common import app_option, get_app, run
from aqueue.control import Replies

__all__ = ["control", "inspect"]

_timeout = click.option(
    "-t", "--timeout", default=1.0, show_default=True, type=float, help="Seconds to wait for replies."
)
_destination = click.option(
    "-d", "--destination", metavar="NAME[,NAME]", help="Only these workers (comma-separated names)."
)


@click.group()
def control() -> None:
    """Change live workers: rate_limit, revoke, enable_events, disable_events."""


@control.command("rate_limit")
@app_option
@click.argument("task_name")
@click.argument("rate")
@_timeout
@_destination
@click.pass_context
def rate_limit(
    ctx: click.Context,
    app_spec: str | None,
    task_name: str,
    rate: str,
    timeout: float,
    destination: str | None,
) -> None:
    """Set TASK_NAME's rate limit (e.g. 10/m, 100/s, 0 for none) on every live worker."""
    app = get_app(ctx, app_spec)
    replies = run(
        _broadcast(app, "rate_limit", {"task_name": task_name, "rate_limit": rate}, timeout, destination)
    )
    _print(replies)


@control.command("revoke")
@app_option
@click.argument("task_ids", nargs=-1, required=True)
@_timeout
@_destination
@click.pass_context
def revoke(
    ctx: click.Context,
    app_spec: str | None,
    task_ids: tuple[str, ...],
    timeout: float,
    destination: str | None,
) -> None:
    """Revoke tasks by id: workers discard them instead of running them."""
    app = get_app(ctx, app_spec)
    _print(run(_broadcast(app, "revoke", {"task_id": list(task_ids)}, timeout, destination)))


def _events_command(name: str, doc: str) -> None:
    @control.command(name, help=doc)
    @app_option
    @_timeout
    @_destination
    @click.pass_context
    def switch(ctx: click.Context, app_spec: str | None, timeout: float, destination: str | None) -> None:
        _print(run(_broadcast(get_app(ctx, app_spec), name, {}, timeout, destination)))


_events_command("enable_events", "Have live workers send task events (as worker -E).")
_events_command("disable_events", "Have live workers stop sending task events.")

INSPECT = (
    "ping",
    "registered",
    "active",
    "stats",
    "active_queues",
    "revoked",
    "conf",
    "reserved",
    "scheduled",
)


@click.command()
@app_option
@click.argument("what", type=click.Choice(INSPECT))
@_timeout
@_destination
@click.pass_context
def inspect(
    ctx: click.Context, app_spec: str | None, what: str, timeout: float, destination: str | None
) -> None:
    """Ask live workers (aqueue's or Celery's): ping, registered (tasks), active (running tasks), stats,
    active_queues, revoked, conf, reserved, scheduled."""
    app = get_app(ctx, app_spec)
    replies = run(_broadcast(app, what, {}, timeout, destination))
    _print(replies)
    if what == "ping":
        click.echo(f"\n{len(replies)} node{'s' if len(replies) != 1 else ''} online.")


async def _broadcast(
    app: App, command: str, arguments: dict[str, Any], timeout: float, destination: str | None
) -> Replies:
    names = [n.strip() for n in destination.split(",")] if destination else None
    try:
        return await app.control.broadcast(command, arguments, destination=names, timeout=timeout)
    finally:
        await app.aclose()


def _print(replies: Replies) -> None:
    if not replies:
        raise click.ClickException("No nodes replied within time constraint.")
    failed = False
    for reply in replies:
        for name, answer in reply.items():
            ok = "error" not in answer
            failed |= not ok
            click.echo(f"-> {name}: {'OK' if ok else 'ERROR'}")
            for line in _lines(answer.get("ok") if ok else answer["error"]):
                click.echo(f"        {line}")
    if failed:
        raise SystemExit(1)


def _lines(value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"* {item}" if isinstance(item, str) else json.dumps(item) for item in value] or ["- empty -"]
    if isinstance(value, dict):
        return json.dumps(value, indent=2, default=str).splitlines()
    return [str(value)]
