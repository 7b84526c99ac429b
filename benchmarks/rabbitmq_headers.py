"""What Celery's header table costs RabbitMQ itself: its CPU per message, by message layout.

    python benchmarks/rabbitmq_headers.py [--messages 20000] [--runs 5] [--url amqp://guest:guest@127.0.0.1:5672//]

Each layout publishes the same task messages (``tasks.add(i, i)``) from one aiormq connection, with
publisher confirms, 500 in flight, into a queue a consumer on another channel drains (no ack), as a
worker would; the figure is the RabbitMQ node's CPU time (``beam.smp``'s user + system time from
``/proc``) over the whole run, divided by the number of messages. Layouts:

- **aqueue's own layout** (aqueue before protocol v2): the whole message as the JSON body, no headers;
- **Celery protocol v2**: the headers, properties and body aqueue and Celery 5 send (twenty header
  fields, encoded by aqueue as py-amqp encodes them);
- **the same headers as one field**: protocol v2's header table serialized into one string header
  (the same bytes on the wire, one field for RabbitMQ to decode);
- **v2 without the empty headers**: protocol v2 with the headers whose value is null (``eta``,
  ``expires``, ``group``, ...) left out.

The aqueue client and worker do not take part, so the table shows what RabbitMQ alone does with each
layout. Layouts run interleaved, each first in turn; each figure is the median over the runs, the
ratio is to aqueue's own layout. Needs the RabbitMQ node on this machine (its process is read).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiormq
from pamqp import commands as spec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aqueue.ids import new_id  # noqa: E402
from aqueue.message import Message  # noqa: E402
from aqueue.protocol import CeleryCodec  # noqa: E402
from aqueue.serialization import get_serializer  # noqa: E402

WINDOW = 500
JSON = get_serializer("json")
CODEC = CeleryCodec()
Properties = spec.Basic.Properties
Layout = Callable[[Message, str], tuple[Properties, bytes]]
"""A message as its properties and body, given the reply queue."""


def native(message: Message, reply_to: str) -> tuple[Properties, bytes]:
    body = JSON.dumps(
        {"id": message.id, "task": message.task, "args": message.args, "kwargs": message.kwargs}
    )
    return Properties(content_type=JSON.content_type, delivery_mode=2, message_id=message.id), body


def celery(
    message: Message, reply_to: str, keep: Callable[[dict[str, Any]], dict[str, Any]] = dict
) -> tuple[Properties, bytes]:
    body, headers = CODEC.encode(message, JSON)
    properties = Properties(
        content_type=JSON.content_type,
        content_encoding="utf-8",
        headers=keep(dict(headers or {})),
        delivery_mode=2,
        priority=0,
        correlation_id=message.id,
        reply_to=reply_to,
        message_id=message.id,
    )
    return properties, body


def one_field(message: Message, reply_to: str) -> tuple[Properties, bytes]:
    _, headers = CODEC.encode(message, JSON)
    packed = JSON.dumps(dict(headers or {})).decode()
    return celery(message, reply_to, lambda _: {"h": packed})


def without_empty(message: Message, reply_to: str) -> tuple[Properties, bytes]:
    return celery(
        message, reply_to, lambda headers: {k: v for k, v in headers.items() if v not in (None, [None, None])}
    )


LAYOUTS: dict[str, Layout] = {
    "aqueue's own layout (before protocol v2)": native,
    "Celery protocol v2": celery,
    "the same headers as one field": one_field,
    "v2 without the empty headers": without_empty,
}


def rabbit_pid() -> int:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    raise SystemExit(
        "No RabbitMQ node (beam.smp) runs on this machine: start it (rabbitmq-server -detached)."
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, layout: Layout, n: int, pid: int) -> float:
    """RabbitMQ's CPU µs per message for ``n`` messages of ``layout``."""
    connection = await aiormq.connect(url)
    try:
        publisher, consumer = await connection.channel(), await connection.channel()
        queue = f"bench-headers-{uuid.uuid4().hex[:8]}"
        await publisher.queue_declare(queue, durable=True)
        got, done = 0, asyncio.Event()

        async def received(_: Any) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set()

        await consumer.basic_consume(queue, received, no_ack=True)
        messages = [layout(Message(new_id(), "tasks.add", [i, i], {}), "amq.gen-reply") for i in range(n)]
        began = cpu_seconds(pid)
        for start in range(0, n, WINDOW):
            await asyncio.gather(
                *(
                    publisher.basic_publish(body, routing_key=queue, properties=properties)
                    for properties, body in messages[start : start + WINDOW]
                )
            )
        async with asyncio.timeout(120):
            await done.wait()
        spent = cpu_seconds(pid) - began
        await publisher.queue_delete(queue)
        return spent / n * 1e6
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    pid = rabbit_pid()
    names = list(LAYOUTS)
    figures: dict[str, list[float]] = {name: [] for name in names}
    started = time.monotonic()
    for run in range(args.runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            figures[name].append(await measure(args.url, LAYOUTS[name], args.messages, pid))
            print(
                f"[run {run + 1}/{args.runs}] {name}: {figures[name][-1]:.1f} µs", file=sys.stderr, flush=True
            )
    base = statistics.median(figures[names[0]])
    print(
        f"RabbitMQ's CPU per message, {args.messages:,} messages per run, median of {args.runs} "
        f"(took {(time.monotonic() - started) / 60:.1f} min)\n"
    )
    print("| layout | RabbitMQ CPU µs/message | ratio | runs |")
    print("|---|---:|---:|---|")
    for name in names:
        median = statistics.median(figures[name])
        runs = ", ".join(f"{value:.0f}" for value in figures[name])
        print(f"| {name} | {median:.1f} | {median / base:.2f}x | {runs} |")


if __name__ == "__main__":
    asyncio.run(main())
