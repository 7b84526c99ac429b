"""``aqueue call``, ``aqueue result`` and ``aqueue purge``."""

from __future__ import annotations

import json
from typing import Any

import click

from aqueue.app import App
from aqueue.cli._common import app_option, get_app, run

__all__ = ["call", "purge", "result"]


def _json(kind: type, text: str | None, option: str) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from exc
    if not isinstance(value, kind):
        raise click.BadParameter(f"must be a JSON {'list' if kind is list else 'object'}", param_hint=option)
    return value


@click.command()
@app_option
@click.argument("name")
@click.option(
    "-a", "--args", "args_json", metavar="JSON", help="Positional arguments as a JSON list: '[4, 4]'."
)
@click.option("-k", "--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--countdown", type=float, help="Seconds before the task may start.")
@click.option("--expires", type=float, help="Seconds after which the task is discarded.")
@click.option("-Q", "--queue", help="Send to this queue instead of the routed one.")
@click.pass_context
def call(
    ctx: click.Context,
    app_spec: str | None,
    name: str,
    args_json: str | None,
    kwargs_json: str | None,
    countdown: float | None,
    expires: float | None,
    queue: str | None,
) -> None:
    """Send task NAME and print its id."""
    app = get_app(ctx, app_spec)
    args, kwargs = _json(list, args_json, "--args"), _json(dict, kwargs_json, "--kwargs")

    async def send() -> str:
        async with app:
            sent = await app.send_task(name, args, kwargs, countdown=countdown, expires=expires, queue=queue)
            return sent.id

    click.echo(run(send()))


@click.command()
@app_option
@click.argument("task_id")
@click.option("-t", "--timeout", type=float, default=None, help="Seconds to wait (default: for ever).")
@click.pass_context
def result(ctx: click.Context, app_spec: str | None, task_id: str, timeout: float | None) -> None:
    """Wait for task TASK_ID and print its result (or its error)."""
    app = get_app(ctx, app_spec)

    async def fetch() -> Any:
        async with app:
            return await app.AsyncResult(task_id).get(timeout=timeout)

    try:
        value = run(fetch())
    except Exception as exc:
        if isinstance(exc, click.ClickException):
            raise
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    click.echo(json.dumps(value, default=repr) if not isinstance(value, str) else value)


@click.command()
@app_option
@click.option("-Q", "--queues", metavar="Q1,Q2", help="Queues to purge (default: task_default_queue).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, app_spec: str | None, queues: str | None, force: bool) -> None:
    """Delete every waiting message from the queues."""
    app = get_app(ctx, app_spec)
    names = [q.strip() for q in queues.split(",")] if queues else [app.conf.task_default_queue]
    if not force:
        click.confirm(
            f"Delete every waiting message in {', '.join(names)}? This cannot be undone", abort=True
        )
    count = run(_purge(app, names))
    click.echo(
        f"Purged {count} message{'s' if count != 1 else ''} from {len(names)} known task "
        f"queue{'s' if len(names) != 1 else ''}."
    )


async def _purge(app: App, names: list[str]) -> int:
    async with app:
        return sum([await app.broker.purge(name) for name in names])
