"""Capture the messages a real Celery sends over RabbitMQ, and what it stores in Redis, as golden data.

Run it by hand against the local RabbitMQ and Redis (it takes about 20 seconds)::

    python tests/golden/capture_celery.py          # writes tests/golden/celery.json

A Celery client in this process sends tasks to a capture queue nobody consumes, and others to two Celery
workers (``--pool solo``; one stores results in Redis, one replies over ``rpc://``). The workers send
messages of their own to the capture queue: a retry, the next step of a chain, a link callback, and rpc
replies (tasks sent with ``reply_to`` naming the capture queue). Then every message of the capture queue
is read with aio-pika, so that nothing of Celery's decodes them, and written with the Redis values. The
queues, the Redis keys and the worker processes are removed at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PIKA_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
OUT = Path(__file__).with_name("celery.json")

TASKS = """
import os
from celery import Celery

app = Celery("gold", broker=os.environ["GOLD_BROKER"], backend=os.environ["GOLD_BACKEND"])
app.conf.update(
    task_default_queue=os.environ["GOLD_CAPTURE"],
    result_backend_transport_options={"global_keyprefix": os.environ["GOLD_PREFIX"]},
    result_expires=600,
)


@app.task
def add(x, y, z=0):
    return x + y + z


@app.task
def tsum(numbers):
    return sum(numbers)


@app.task
def on_error(*args):
    return None


@app.task
def fail(message):
    raise ValueError(message, 42)


@app.task(bind=True)
def retrying(self, n):
    raise self.retry(countdown=30, queue=os.environ["GOLD_CAPTURE"], exc=KeyError("again"))
"""


def main() -> None:
    unique = uuid.uuid4().hex[:8]
    capture, redis_queue, rpc_queue = f"gold-capture-{unique}", f"gold-redis-{unique}", f"gold-rpc-{unique}"
    prefix = f"gold-{unique}:"
    folder = Path(tempfile.mkdtemp(prefix="gold-"))
    (folder / "goldtasks.py").write_text(TASKS)
    env = {**os.environ, "GOLD_BROKER": AMQP_URL, "GOLD_CAPTURE": capture, "GOLD_PREFIX": prefix}
    env["PYTHONPATH"] = str(folder)
    workers = [
        _worker(folder, {**env, "GOLD_BACKEND": REDIS_URL}, redis_queue, "redis"),
        _worker(folder, {**env, "GOLD_BACKEND": "rpc://"}, rpc_queue, "rpc"),
    ]
    try:
        os.environ.update({**env, "GOLD_BACKEND": REDIS_URL})
        sys.path.insert(0, str(folder))
        ids = _send(capture, redis_queue, rpc_queue)
        # Worker-sent messages: wait until each has arrived in the capture queue.
        found = asyncio.run(_read(capture, expected=len(ids["expected"])))
        messages = _labelled(found, ids["labels"])
        redis_values = _redis_values(prefix, ids["stored"])
        data = {
            "celery": _version(),
            "capture_queue": capture,
            "messages": messages,
            "redis": redis_values,
        }
        OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(messages)} messages and {len(redis_values)} results to {OUT}")
        sys.stdout.flush()
    finally:
        for worker in workers:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
        asyncio.run(_delete_queues([capture, redis_queue, rpc_queue]))
        _delete_keys(prefix)


def _worker(folder: Path, env: dict[str, str], queue: str, name: str) -> subprocess.Popen[bytes]:
    log = (folder / f"{name}.log").open("wb")
    argv = [sys.executable, "-m", "celery", "-A", "goldtasks", "worker", "--pool", "solo", "-Q", queue]
    argv += [
        "-n",
        f"{name}@gold",
        "-l",
        "info",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    return subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def _send(capture: str, redis_queue: str, rpc_queue: str) -> dict[str, Any]:
    from celery import chain, chord, group
    from goldtasks import add, fail, on_error, retrying, tsum  # type: ignore[import-not-found]

    labels: dict[str, str] = {}
    labels["delay"] = add.delay(4, 4).id
    labels["options"] = add.apply_async(
        (2, 3),
        {"z": 1},
        countdown=30,
        expires=60,
        priority=5,
        time_limit=10,
        soft_time_limit=5,
        ignore_result=True,
        headers={"custom": "value"},
        shadow="add-shadowed",
    ).id
    labels["eta"] = add.apply_async((5, 5), eta=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)).id
    labels["link"] = add.apply_async((1, 1), link=add.s(10), link_error=on_error.si()).id
    result = chain(add.s(1, 2), add.s(3), add.s(4)).apply_async()
    labels["chain"] = result.parent.parent.id
    members = group(add.s(1, 1), add.s(2, 2)).apply_async()
    labels["group_0"], labels["group_1"] = (r.id for r in members.results)
    joined = chord([add.s(3, 3), add.s(4, 4)], tsum.s()).apply_async()
    labels["chord_0"], labels["chord_1"] = (r.id for r in joined.parent.results)
    # Sent by the workers.
    labels["worker_retry"] = retrying.apply_async((1,), queue=redis_queue).id
    step = chain(add.s(1, 2).set(queue=redis_queue), add.s(3)).apply_async()
    labels["worker_chain_step"] = step.id
    labels["worker_link"] = add.apply_async((2, 2), queue=redis_queue, link=add.s(100)).id
    labels["rpc_success"] = add.apply_async((7, 8), queue=rpc_queue, reply_to=capture).id
    labels["rpc_failure"] = fail.apply_async(("boom",), queue=rpc_queue, reply_to=capture).id
    stored = {
        "success": add.apply_async((20, 22), queue=redis_queue).id,
        "failure": fail.apply_async(("bad",), queue=redis_queue).id,
    }
    for task_id in stored.values():
        add.AsyncResult(task_id).get(timeout=30, propagate=False)
    labels.update({f"stored_{k}": v for k, v in stored.items()})
    # Every label but these names a message in the capture queue; the link's callback is one more.
    expected = [k for k in labels if not k.startswith("stored_") and k != "worker_link"]
    return {"labels": labels, "expected": [*expected, "worker_link_callback"], "stored": stored}


async def _read(queue: str, expected: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The messages of ``queue`` as RabbitMQ holds them: raw properties, headers as pamqp decodes them."""
    import aiormq

    connection = await aiormq.connect(PIKA_URL)
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        channel = await connection.channel()
        while len(found) < expected and time.monotonic() < deadline:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:
                await asyncio.sleep(0.2)
                continue
            properties = message.header.properties
            found.append(
                {
                    "exchange": message.exchange,
                    "routing_key": message.routing_key,
                    "properties": {
                        name: getattr(properties, name)
                        for name in _PROPERTIES
                        if getattr(properties, name) is not None
                    },
                    "headers": _plain(properties.headers),
                    "body": message.body.decode(),
                }
            )
    finally:
        await connection.close()
    if len(found) < expected:
        raise SystemExit(f"only {len(found)} of {expected} messages arrived in {queue}")
    return found


_PROPERTIES = (
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
    "expiration", "message_id", "timestamp", "message_type", "user_id", "app_id",
)  # fmt: skip


def _labelled(found: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each message under its scenario's name: by task id, by correlation id for rpc replies."""
    by_id = {task_id: label for label, task_id in labels.items()}
    named: dict[str, dict[str, Any]] = {}
    for message in found:
        headers = message["headers"] or {}
        if "task" not in headers:
            named[by_id[message["properties"]["correlation_id"]]] = message
        elif headers["id"] in by_id:
            named[by_id[headers["id"]]] = message
        elif headers.get("parent_id") == labels["worker_link"]:
            named["worker_link_callback"] = message
        else:
            raise SystemExit(f"a message nobody sent: {message}")
    return dict(sorted(named.items()))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode()
    return value


def _redis_values(prefix: str, stored: dict[str, str]) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return {
            label: cast(bytes, client.get(f"{prefix}celery-task-meta-{task_id}")).decode()
            for label, task_id in stored.items()
        }
    finally:
        client.close()


def _delete_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def _delete_queues(names: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(PIKA_URL)
    async with connection:
        for name in names:
            channel = await connection.channel()
            await channel.queue_delete(name)
            await channel.exchange_delete(name)


def _version() -> str:
    import celery
    import kombu

    return f"celery {celery.__version__}, kombu {kombu.__version__}"


if __name__ == "__main__":
    main()
    os._exit(0)  # Celery's result consumers would otherwise reconnect while the interpreter shuts down
