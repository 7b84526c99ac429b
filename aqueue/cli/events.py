"""``aqueue events``: print the monitoring events of the app's workers and clients as they happen."""

from __future__ import annotations

import asyncio
import sys

import click
import pydantic_core

from aqueue.app import App
from aqueue.cli._common import app_option, get_app, run
from aqueue.events import EventReceiver, dump_line

__all__ = ["events"]


@click.command()
@app_option
@click.option("--dump", is_flag=True, help="One line per event, as 'celery events --dump' (the default).")
@click.option("--json", "as_json", is_flag=True, help="Each event as one line of JSON instead.")
@click.option("--routing-key", default="#", show_default=True, help="Which events, e.g. 'task.#'.")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--timeout", type=float, metavar="SECONDS", help="Stop after this many seconds.")
@click.pass_context
def events(
    ctx: click.Context,
    app_spec: str | None,
    dump: bool,
    as_json: bool,
    routing_key: str,
    limit: int | None,
    timeout: float | None,
) -> None:
    """Print the events of workers started with -E (and of clients with task_send_sent_event).

    \b
    python -m aqueue -A tasks events --dump
    python -m aqueue -A tasks events --json --routing-key 'task.#'
    """
    app = get_app(ctx, app_spec)
    try:
        run(_print_events(app, as_json, routing_key, limit, timeout))
    except KeyboardInterrupt:
        pass


async def _print_events(
    app: App, as_json: bool, routing_key: str, limit: int | None, timeout: float | None
) -> None:
    conf, names, seen = app.conf, dict[str, str](), 0
    receiver = EventReceiver(
        app.broker,
        exchange=conf.event_exchange,
        routing_key=routing_key,
        queue_prefix=conf.event_queue_prefix,
        queue_ttl=conf.event_queue_ttl,
        queue_expires=conf.event_queue_expires,
    )
    out = sys.stdout
    try:
        await app.connect()
        async with receiver.batches() as batches, asyncio.timeout(timeout):
            click.echo("-> events: starting capture...", err=True)
            async for batch in batches:
                # One write and one flush per message, which may carry a thousand events.
                if limit is not None:
                    batch = batch[: limit - seen]
                if as_json:
                    lines = [pydantic_core.to_json(event, fallback=str).decode() for event in batch]
                else:
                    lines = [dump_line(event, names) for event in batch]
                out.write("\n".join(lines) + "\n")
                out.flush()
                seen += len(batch)
                if limit is not None and seen >= limit:
                    break
    except TimeoutError:
        pass
    finally:
        await app.aclose()
