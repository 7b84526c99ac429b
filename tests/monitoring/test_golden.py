"""aqueue's encoders and decoders against what a real Celery 5.7 worker and CLI sent (``golden/``), field by field.

The golden files are made by ``golden/capture.py``. Values differ from run to run (ids, pids, times);
what must agree is the layout: channel names, envelopes, properties, queue arguments, and each event's
and reply's field names and value types.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import amqp.serialization
import anyio
import pytest

from aqueue import App
from aqueue.broker.amqp_exchange import _arguments, properties
from aqueue.broker.exchange import ExchangeMessage, Listener
from aqueue.broker.memory import MemoryBroker
from aqueue.broker.redis import RedisBroker
from aqueue.broker.redis_exchange import SEP, RedisExchanges, envelope, open_envelope
from aqueue.control import Mailbox, as_reply
from aqueue.events import EventReceiver, event_exchange
from aqueue.worker import Worker
from aqueue.worker.control import COMMANDS
from tests.conftest import REDIS_URL, require_server, transport_for

from .golden import TRANSPORTS, golden
from .scenario import EVERY_EVENT, define_tasks, send_every_kind

MakeApp = Callable[..., App]


def kinds(value: Any) -> str:
    """The JSON kind of a value: what must agree between Celery's fields and aqueue's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def assert_same_fields(ours: dict[str, Any], celerys: dict[str, Any], what: str) -> None:
    assert sorted(ours) == sorted(celerys), f"{what}: field names differ"
    for name, value in celerys.items():
        if value is not None and ours[name] is not None:
            assert kinds(ours[name]) == kinds(value), f"{what}.{name}: {ours[name]!r} vs Celery's {value!r}"


async def aqueue_events(make_app: MakeApp) -> list[dict[str, Any]]:
    """Every event an aqueue worker (with -E) and a client (task_send_sent_event) send, on memory://."""
    app = make_app(task_send_sent_event=True)
    define_tasks(app)
    seen: list[dict[str, Any]] = []
    async with app, EventReceiver(app.broker).events() as stream:

        async def collect() -> None:
            async for event in stream:
                seen.append(event)

        async with anyio.create_task_group() as group:
            group.start_soon(collect)
            async with Worker(app, concurrency=4, hostname="golden@aqueue", send_events=True):
                await send_every_kind(app, "golden@aqueue")
                with anyio.fail_after(10):
                    while not EVERY_EVENT - {"worker-offline"} <= {e["type"] for e in seen}:
                        await anyio.sleep(0.05)
            with anyio.fail_after(5):
                while "worker-offline" not in {e["type"] for e in seen}:
                    await anyio.sleep(0.02)
            group.cancel_scope.cancel()
    return seen


async def test_every_event_has_celerys_fields(make_app: MakeApp) -> None:
    # Given the events of an aqueue worker and client that did what the golden Celery ones did
    ours = await aqueue_events(make_app)
    first: dict[str, dict[str, Any]] = {}
    for event in ours:
        first.setdefault(event["type"], event)
    # Then each type carries exactly Celery's fields, with values of the same kinds
    for transport in TRANSPORTS:
        celerys = golden(transport).events()
        assert set(first) == set(celerys) == EVERY_EVENT
        for kind, event in celerys.items():
            assert_same_fields(first[kind], event, f"{transport}: {kind}")
    # And the unknown task's failure is told as Celery tells it
    unknown = next(e for e in ours if e["type"] == "task-failed" and "traceback" not in e)
    assert unknown["exception"] == "NotRegistered('tasks.unknown')"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_args_kwargs_result_and_exception_are_reprs(transport: str) -> None:
    celerys = golden(transport).events()
    assert celerys["task-received"]["args"] == "[2, 2]" and celerys["task-received"]["kwargs"] == "{}"
    assert celerys["task-succeeded"]["result"] == "4"
    assert celerys["task-failed"]["exception"] == "ValueError('boom')"


# Redis: channels and kombu's envelope ---------------------------------------------------------------


def redis_records(command: str) -> list[dict[str, Any]]:
    return [r for r in golden("redis").data["records"] if r["command"][0] == command]


def test_redis_channels_are_kombus() -> None:
    # Given aqueue's exchanges on the golden capture's database
    exchanges = RedisExchanges(RedisBroker(f"{REDIS_URL}/{golden('redis').data['db']}"))
    # Then every channel Celery published on is the one aqueue names for that exchange and key
    published = redis_records("PUBLISH")
    assert len(published) > 20
    for record in published:
        info = record["payload"]["properties"]["delivery_info"]
        kind = "topic" if info["exchange"] == "celeryev" else "fanout"
        exchange = event_exchange() if kind == "topic" else Mailbox().exchange
        assert exchanges.channel(exchange, info["routing_key"]) == record["command"][1]


def test_redis_envelope_is_kombus() -> None:
    exchanges = {e.name: e for e in (event_exchange(), Mailbox().exchange, Mailbox().reply_exchange)}
    records = [r for r in redis_records("PUBLISH") + redis_records("LPUSH") if ".reply." in r["command"][1]]
    records += redis_records("PUBLISH")
    for record in records:
        theirs = record["payload"]
        info = theirs["properties"]["delivery_info"]
        body = base64.b64decode(theirs["body"])
        # When aqueue wraps the same message
        exchange = exchanges[info["exchange"]]
        message = ExchangeMessage(
            body, theirs["headers"], info["routing_key"], delivery_mode=theirs["properties"]["delivery_mode"]
        )
        ours = json.loads(envelope(exchange, message))
        # Then the envelope has the same fields and values (but its own delivery tag)
        assert sorted(ours) == sorted(theirs)
        assert sorted(ours["properties"]) == sorted(theirs["properties"])
        for name in ("content-encoding", "content-type", "headers"):
            assert ours[name] == theirs[name]
        for name in ("delivery_mode", "priority", "body_encoding"):
            assert ours["properties"][name] == theirs["properties"][name]
        assert ours["properties"]["delivery_info"]["routing_key"] == info["routing_key"]
        assert base64.b64decode(ours["body"]) == body
        # And aqueue reads Celery's envelope back
        read = open_envelope(json.dumps(theirs).encode())
        assert (read.body, read.headers, read.routing_key) == (body, theirs["headers"], info["routing_key"])
        assert read.delivery_mode == theirs["properties"]["delivery_mode"]


def test_redis_reply_binding_is_kombus() -> None:
    # Given the binding a Celery client added for its replies (SADD of the binding table)
    sadd = next(r for r in redis_records("SADD") if r["command"][1] == "_kombu.binding.reply.celery.pidbox")
    oid = sadd["payload"].split(SEP)[0]
    # Then aqueue's listener for replies to the same id is that queue, bound with that key
    listener = Mailbox().replies(oid)
    assert SEP.join([listener.binding_key, "", listener.queue]) == sadd["payload"]
    # And the binding's deadline is refreshed with the same table and lifetime
    refresh = next(
        r for r in redis_records("EVALSHA") if r["command"][2:5:2] == ["2", "_kombu.binding_deadlines"]
    )
    tables = ["_kombu.binding.reply.celery.pidbox", "_kombu.binding_deadlines"]
    assert refresh["command"][3:] == [*tables, sadd["payload"], Mailbox().reply_exchange.name]
    assert refresh["payload"] == 3_600_000


async def test_redis_binding_lands_where_kombu_looks(tmp_path: Any, unique: str) -> None:
    require_server("redis")
    async with transport_for("redis", tmp_path, unique) as transport:
        broker = RedisBroker(transport.broker_url, global_keyprefix=transport.prefix)
        oid = str(uuid.uuid4())
        table = f"{transport.prefix}_kombu.binding.reply.celery.pidbox"
        async with broker:
            async with broker.bind_exchange(Mailbox().reply_exchange, Mailbox().replies(oid)):
                members = await broker._client.smembers(table)
                deadline = await broker._client.zscore(
                    f"{transport.prefix}_kombu.binding_deadlines", "reply.celery.pidbox"
                )
                assert members == {f"{oid}{SEP}{SEP}{oid}.reply.celery.pidbox".encode()}
                assert deadline is not None
            # And leaving removes the binding
            assert await broker._client.exists(table) == 0


# RabbitMQ: properties and declarations --------------------------------------------------------------


def test_amqp_properties_are_kombus() -> None:
    for wire in golden("amqp").wires:
        if wire.exchange not in ("celeryev", "celery.pidbox", "reply.celery.pidbox"):
            continue
        theirs = wire.raw["properties"]
        message = ExchangeMessage(
            b"", theirs["headers"], wire.routing_key, delivery_mode=theirs["delivery_mode"]
        )
        raw = properties(message)
        # Then py-amqp (what kombu reads with) decodes aqueue's properties to Celery's
        decoded, _ = amqp.serialization.decode_properties_basic(raw, 0)
        decoded["headers"] = decoded.pop("application_headers")
        assert decoded == theirs
        assert struct.unpack(">H", raw[:2])[0] == 0xF800


def declared(kind: str) -> dict[str, dict[str, Any]]:
    found = golden("amqp").data["declared"]["with a client"][kind]
    return {item["name"]: item for item in found}


def test_amqp_exchanges_are_declared_as_celerys() -> None:
    theirs = declared("exchanges")
    mailbox = Mailbox()
    for ours in (event_exchange(), mailbox.exchange, mailbox.reply_exchange):
        assert (ours.type, ours.durable) == (theirs[ours.name]["type"], theirs[ours.name]["durable"])


def test_amqp_queues_are_declared_as_celerys() -> None:
    theirs = declared("queues")

    def arguments(name_part: str) -> dict[str, Any]:
        queue = next(q for name, q in theirs.items() if name_part in name)
        assert (queue["durable"], queue["auto_delete"], queue["exclusive"]) == (False, True, True)
        return {key: value for key, _, value in queue["arguments"]}

    events = EventReceiver(MemoryBroker()).listener
    assert _arguments(events) == arguments("celeryev.")
    assert _arguments(Mailbox().node("golden@capture")) == arguments("golden@capture.celery.pidbox")
    assert _arguments(Mailbox().replies(str(uuid.uuid4()))) == arguments(".reply.celery.pidbox")
    assert events.binding_key == "#" and events.queue.startswith("celeryev.")


# Remote control: requests and replies ---------------------------------------------------------------


async def requests_sent_by(app: App, command: str, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request aqueue's client sends for ``command``, read off the mailbox exchange."""
    mailbox = Mailbox.of(app.conf)
    async with app, app.broker.bind_exchange(mailbox.exchange, Listener("spy")) as inbox:
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: app.control.broadcast(command, timeout=0.3, **options))
            with anyio.fail_after(5):
                message = await anext(inbox)
        return json.loads(message.body), message.headers


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_requests_are_celerys(make_app: MakeApp, transport: str) -> None:
    theirs = golden(transport).requests()["ping"]
    body, headers = await requests_sent_by(make_app(), "ping")
    assert_same_fields(body, theirs.body, "request")
    assert sorted(body["reply_to"]) == sorted(theirs.body["reply_to"]) == ["exchange", "routing_key"]
    assert body["reply_to"]["exchange"] == f"reply.{make_app().conf.control_exchange}.pidbox"
    assert_same_fields(headers, theirs.headers, "request headers")


@pytest.fixture
async def busy_worker(make_app: MakeApp) -> AsyncIterator[Worker]:
    """An aqueue worker running one ``tasks.sleep``."""
    app = make_app()
    define_tasks(app)
    async with app, Worker(app, concurrency=2, hostname="golden@aqueue", shutdown_timeout=0.2) as worker:
        app.send_task("tasks.sleep", [30])
        with anyio.fail_after(5):
            while not worker.state.active:
                await anyio.sleep(0.01)
        yield worker


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_replies_have_celerys_shapes(busy_worker: Worker, transport: str) -> None:
    theirs = golden(transport).replies()
    ours = {method: await COMMANDS[method](busy_worker, {}) for method in theirs}
    # Control commands and ping: the same {'ok': ...}
    for method in ("ping", "enable_events"):
        assert sorted(ours[method]) == sorted(theirs[method]) == ["ok"]
    assert ours["ping"] == theirs["ping"] == {"ok": "pong"}
    assert ours["heartbeat"] is theirs["heartbeat"] is None
    # stats: Celery's keys (and aqueue's own), the pool's and the broker's
    assert set(theirs["stats"]) <= set(ours["stats"])
    assert set(theirs["stats"]["pool"]) - {"writes"} <= set(ours["stats"]["pool"])
    assert_same_fields(ours["stats"]["broker"], theirs["stats"]["broker"], "broker")
    assert_same_fields(ours["stats"]["rusage"], theirs["stats"]["rusage"], "rusage")
    # active: requests as Celery's Request.info()
    assert_same_fields(ours["active"][0], theirs["active"][0], "active request")
    assert_same_fields(
        ours["active"][0]["delivery_info"], theirs["active"][0]["delivery_info"], "delivery_info"
    )
    # active_queues: kombu's Queue.as_dict()
    assert_same_fields(ours["active_queues"][0], theirs["active_queues"][0], "queue")
    assert_same_fields(
        ours["active_queues"][0]["exchange"], theirs["active_queues"][0]["exchange"], "exchange"
    )
    # lists of names and ids, and conf as a mapping
    for method in ("registered", "revoked", "scheduled", "reserved"):
        assert isinstance(ours[method], list) and isinstance(theirs[method], list)
    assert all(isinstance(name, str) for name in ours["registered"] + theirs["registered"])
    assert isinstance(ours["conf"], dict) and isinstance(theirs["conf"], dict)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_celerys_replies_read_as_aqueue_replies(transport: str) -> None:
    theirs = golden(transport).replies()
    assert as_reply(theirs["ping"]) == {"ok": "pong"}
    assert as_reply(theirs["rate_limit"]) == {"ok": "new rate limit set successfully"}
    assert as_reply(theirs["stats"]) == {"ok": theirs["stats"]}
    assert as_reply(theirs["active"]) == {"ok": theirs["active"]}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_aqueue_worker_answers_celerys_requests(busy_worker: Worker, transport: str) -> None:
    # Given each request Celery's CLI sent, addressed to a reply queue of ours
    app, mailbox = busy_worker.app, Mailbox.of(busy_worker.app.conf)
    oid = str(uuid.uuid4())
    async with app.broker.bind_exchange(mailbox.reply_exchange, mailbox.replies(oid)) as inbox:
        for method, request in golden(transport).requests().items():
            body = dict(request.body, reply_to={"exchange": mailbox.reply_exchange.name, "routing_key": oid})
            message = ExchangeMessage(json.dumps(body).encode(), request.headers, delivery_mode=2)
            await app.broker.send_to_exchange(mailbox.exchange, message)
            # Then the worker replies to it, with the ticket, under its name
            with anyio.fail_after(5):
                reply = await anext(inbox)
            assert reply.headers["ticket"] == request.body["ticket"], method
            answer = json.loads(reply.body)
            assert list(answer) == ["golden@aqueue"], method
            assert "error" not in (answer["golden@aqueue"] or {}), (method, answer)
