"""Capture what a real Celery client puts on Redis (kombu's list layout) as golden data.

Run it by hand against the local Redis (it takes a few seconds)::

    python tests/golden/capture_celery_redis.py          # writes tests/golden/celery_redis.json

A Celery client in this process sends tasks to a capture queue nobody consumes (under a key prefix of
its own). Then every key under the prefix is read with redis-py, so that nothing of kombu's decodes
them: the queue's lists (one per priority step) and the binding sets. Last, one message is taken with
kombu's own channel without acknowledging it, to record how kombu holds it (its ``unacked`` hash and
``unacked_index``), and kombu's ``restore_visible`` gives it back, to record how a given-back message is
marked. The keys are removed at the end.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere
from tests.golden.calls import OPTIONS

REDIS_URL = "redis://127.0.0.1:6379/0"
OUT = Path(__file__).with_name("celery_redis.json")


def main() -> None:
    import redis
    from celery import Celery, chain

    unique = uuid.uuid4().hex[:8]
    queue, prefix = f"gold-capture-{unique}", f"gold-{unique}:"
    options = {"global_keyprefix": prefix, "visibility_timeout": 0.2}
    app = Celery("gold", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.update(task_default_queue=queue, broker_transport_options=options, result_expires=600)
    app.conf.result_backend_transport_options = {"global_keyprefix": prefix}

    @app.task(name="goldtasks.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int, z: int = 0) -> int:
        return x + y + z

    client = redis.Redis.from_url(REDIS_URL)
    try:
        labels = {"delay": add.delay(4, 4).id}
        labels["options"] = add.apply_async((2, 3), {"z": 1}, **OPTIONS).id
        labels["eta"] = add.apply_async((5, 5), eta=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)).id
        labels["priority_9"] = add.apply_async((9, 9), priority=9).id
        labels["link"] = add.apply_async((1, 1), link=add.s(10)).id
        labels["chain"] = chain(add.s(1, 2), add.s(3)).apply_async().parent.id
        keys = _read(client, prefix)
        messages = _labelled(keys, prefix, queue, labels)
        held = _held(app, client, prefix, queue, labels["delay"])
        data = {
            "celery": _version(),
            "queue": queue,
            "prefix": prefix,
            "keys": {key: value["type"] for key, value in keys.items()},
            "bindings": {key: value["members"] for key, value in keys.items() if value["type"] == "set"},
            "messages": messages,
            "held": held,
        }
        OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(messages)} messages to {OUT}")
    finally:
        found = list(client.scan_iter(match=f"{prefix}*"))
        if found:
            client.delete(*found)
        client.close()


def _read(client: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """Every key under ``prefix`` (without it): its type, and its items or members."""
    out: dict[str, dict[str, Any]] = {}
    for raw in sorted(client.scan_iter(match=f"{prefix}*")):
        key, kind = raw.decode()[len(prefix) :], client.type(raw).decode()
        if kind == "list":
            out[key] = {"type": kind, "items": [v.decode() for v in client.lrange(raw, 0, -1)]}
        elif kind == "set":
            out[key] = {"type": kind, "members": sorted(v.decode() for v in client.smembers(raw))}
        else:
            out[key] = {"type": kind}
    return out


def _labelled(
    keys: dict[str, dict[str, Any]], prefix: str, queue: str, labels: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Each message under its scenario's name, with the list it is in (the queue's name, then a suffix)."""
    by_id = {task_id: label for label, task_id in labels.items()}
    named: dict[str, dict[str, Any]] = {}
    for key, value in keys.items():
        if value["type"] != "list" or not key.startswith(queue):
            continue
        for item in value["items"]:
            payload = json.loads(item)
            label = by_id.get(payload["headers"]["id"])
            if label is None:
                raise SystemExit(f"a message nobody sent: {item}")
            named[label] = {"list_suffix": key[len(queue) :], "raw": item}
    if set(named) != set(labels):
        raise SystemExit(f"missing messages: {set(labels) - set(named)}")
    return dict(sorted(named.items()))


def _held(app: Any, client: Any, prefix: str, queue: str, task_id: str) -> dict[str, Any]:
    """How kombu holds a message it delivered (unacknowledged), and how it gives it back once stale."""
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        message = None
        for _ in range(20):  # take messages until the plain call's (priority lists come after)
            message = channel.basic_get(queue, no_ack=False)
            if message is not None and message.headers["id"] == task_id:
                break
        if message is None:
            raise SystemExit("kombu delivered nothing")
        tag = message.delivery_tag
        value = client.hget(f"{prefix}unacked", tag).decode()
        score = client.zscore(f"{prefix}unacked_index", tag)
        time.sleep(0.5)  # past the visibility timeout
        channel.qos.restore_visible(num=100, interval=1)
        back = [json.loads(v) for v in client.lrange(f"{prefix}{queue}", 0, -1)]
        restored = next(p for p in back if p["properties"]["delivery_tag"] == tag)
        return {
            "tag": tag,
            "unacked": value,
            "index_score_type": type(score).__name__,
            "restored": json.dumps(restored),
            "restored_to": "right end (taken next)" if back[-1] is restored else "not the right end",
        }


def _version() -> str:
    import celery
    import kombu

    return f"celery {celery.__version__}, kombu {kombu.__version__}"


if __name__ == "__main__":
    main()
    sys.exit(0)
