"""Events: Celery's fields, one message per loop turn and group, the receiver, and Celery's dump format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from celery.events.dumper import Dumper

from aqueue import App
from aqueue.broker.exchange import Exchange, ExchangeMessage
from aqueue.events import EventDispatcher, EventReceiver, dump_line, safe_repr, task_received_fields
from aqueue.exceptions import OperationalError
from aqueue.message import Message

MakeApp = Callable[..., App]


class Outbox:
    """A ``send`` that keeps what it was given (and fails while ``failing``)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Exchange, ExchangeMessage]] = []
        self.failing = False

    async def __call__(self, exchange: Exchange, message: ExchangeMessage) -> None:
        if self.failing:
            raise OperationalError("broker down")
        self.sent.append((exchange, message))

    def bodies(self) -> list[tuple[str, Any]]:
        return [(m.routing_key, json.loads(m.body)) for _, m in self.sent]


async def test_one_loop_turns_events_go_as_one_message_per_group() -> None:
    outbox = Outbox()
    dispatcher = EventDispatcher(outbox, "w1@test", exchange="celeryev")
    # When three task events and one worker event are sent in one loop turn
    for kind in ("task-received", "task-started", "task-succeeded"):
        dispatcher.send(kind, uuid="t1")
    dispatcher.send("worker-heartbeat", freq=2.0)
    await dispatcher.aclose()
    # Then the task events go as one list (task.multi), the worker event alone with its own key
    (key1, tasks), (key2, beat) = outbox.bodies()
    assert key1 == "task.multi" and [e["type"] for e in tasks] == [
        "task-received",
        "task-started",
        "task-succeeded",
    ]
    assert key2 == "worker.heartbeat" and beat["type"] == "worker-heartbeat"
    # And each event has Celery's common fields, the clock going forward
    for event in [*tasks, beat]:
        assert {"hostname", "utcoffset", "pid", "clock", "timestamp", "type"} <= set(event)
    assert [e["clock"] for e in tasks] == sorted(e["clock"] for e in tasks)
    exchange, message = outbox.sent[0]
    assert (exchange.name, exchange.type, exchange.durable) == ("celeryev", "topic", True)
    assert message.headers == {"hostname": "w1@test"} and message.delivery_mode == 1


async def test_a_single_event_goes_alone_with_its_routing_key() -> None:
    outbox = Outbox()
    dispatcher = EventDispatcher(outbox, "w1@test")
    dispatcher.send("task-succeeded", uuid="t1", result="4", runtime=0.1)
    await dispatcher.aclose()
    [(key, body)] = outbox.bodies()
    assert key == "task.succeeded" and body["uuid"] == "t1" and body["result"] == "4"


async def test_events_of_a_group_that_is_off_are_not_sent() -> None:
    outbox = Outbox()
    dispatcher = EventDispatcher(outbox, "w1@test", groups=("worker",))
    dispatcher.send("task-started", uuid="t1")
    await dispatcher.aclose()
    assert outbox.sent == []


async def test_events_that_cannot_be_sent_are_dropped_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = Outbox()
    outbox.failing = True
    dispatcher = EventDispatcher(outbox, "w1@test")
    with caplog.at_level(logging.INFO, logger="aqueue.events"):
        for _ in range(3):
            dispatcher.send("task-started", uuid="t1")
            await dispatcher.aclose()
        outbox.failing = False
        dispatcher.send("task-started", uuid="t2")
        await dispatcher.aclose()
    assert (
        caplog.text.count("Cannot send events") == 1
        and "Sending events to exchange 'celeryev' again" in caplog.text
    )
    assert [body["uuid"] for _, body in outbox.bodies()] == ["t2"]


def test_task_fields_are_reprs_and_iso_times() -> None:
    message = Message("t1", "tasks.add", (2, 2), {"z": 1}, retries=3, eta=0.0, expires=86400.0)
    fields = task_received_fields(message)
    assert fields["args"] == "[2, 2]" and fields["kwargs"] == "{'z': 1}" and fields["retries"] == 3
    assert fields["eta"] == "1970-01-01T00:00:00+00:00" and fields["expires"] == "1970-01-02T00:00:00+00:00"
    assert fields["root_id"] == "t1" and fields["parent_id"] is None
    child = task_received_fields(Message("t2", "tasks.add", root_id="t0", parent_id="t1"))
    assert (child["root_id"], child["parent_id"]) == ("t0", "t1")
    assert len(safe_repr("x" * 5000)) == 1024


async def test_the_receiver_reads_lists_single_events_and_skips_the_rest(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    async with app, EventReceiver(app.broker).events() as events:
        dispatcher = EventDispatcher(app.broker.send_to_exchange, "w1@test")
        exchange = dispatcher.exchange
        await app.broker.send_to_exchange(exchange, ExchangeMessage(b"not json", {}, "task.multi"))
        dispatcher.send("task-received", uuid="t1")
        dispatcher.send("task-started", uuid="t1")
        await dispatcher.aclose()
        dispatcher.send("worker-online", freq=2.0)
        await dispatcher.aclose()
        with anyio.fail_after(5):
            got = [await anext(events) for _ in range(3)]
    assert [e["type"] for e in got] == ["task-received", "task-started", "worker-online"]
    assert "Ignoring an event message that is not JSON" in caplog.text


async def test_the_receiver_gives_batches_as_they_were_sent(make_app: MakeApp) -> None:
    app = make_app()
    async with app, EventReceiver(app.broker).batches() as batches:
        dispatcher = EventDispatcher(app.broker.send_to_exchange, "w1@test")
        for kind in ("task-received", "task-started", "task-succeeded"):
            dispatcher.send(kind, uuid="t1")
        await dispatcher.aclose()
        dispatcher.send("worker-online", freq=2.0)
        await dispatcher.aclose()
        with anyio.fail_after(5):
            got = [await anext(batches) for _ in range(2)]
    assert [[e["type"] for e in batch] for batch in got] == [
        ["task-received", "task-started", "task-succeeded"],
        ["worker-online"],
    ]


async def test_clients_send_task_sent_with_task_send_sent_event(make_app: MakeApp) -> None:
    app = make_app(task_send_sent_event=True)
    async with app, EventReceiver(app.broker).events() as events:
        result = await app.send_task("tasks.add", [1, 2])
        with anyio.fail_after(5):
            event = await anext(events)
    assert event["type"] == "task-sent" and event["uuid"] == result.id
    assert (event["queue"], event["exchange"], event["routing_key"]) == (
        app.conf.task_default_queue,
        "",
        app.conf.task_default_queue,
    )
    assert event["hostname"].startswith("gen")


async def test_clients_send_no_task_sent_by_default(make_app: MakeApp) -> None:
    app = make_app()
    async with app, EventReceiver(app.broker).events() as events:
        await app.send_task("tasks.add", [1, 2])
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.3):
                await anext(events)


EVENTS = [
    {"type": "worker-heartbeat", "hostname": "w1@test", "timestamp": 1796123574.01, "clock": 21, "freq": 2.0, "active": 0},
    {"type": "task-received", "hostname": "w1@test", "timestamp": 1796123572.34, "clock": 2, "uuid": "t1",
     "name": "tasks.add", "args": "[2, 2]", "kwargs": "{}", "retries": 0, "eta": None},
    {"type": "task-succeeded", "hostname": "w1@test", "timestamp": 1796123572.35, "clock": 6, "uuid": "t1",
     "result": "4", "runtime": 0.00037},
    {"type": "task-started", "hostname": "w1@test", "timestamp": 1796123572.35, "clock": 5, "uuid": "t9"},
]  # fmt: skip


def test_dump_lines_are_celerys() -> None:
    # Given Celery's own dumper
    out = io.StringIO()
    dumper, names = Dumper(out=out), dict[str, str]()
    # Then aqueue prints each event as it does
    for event in EVENTS:
        dumper.on_event(dict(event))
        assert dump_line(event, names) == out.getvalue().splitlines()[-1].rstrip()
