"""Celery's message protocol v2, against messages a real Celery 5.7 sent (tests/golden/celery.json).

The golden messages were captured from RabbitMQ by ``tests/golden/capture_celery.py``: sent by a
Celery client (``delay``, options, a link, a chain, a group, a chord) and by Celery workers (a retry,
a chain's next step, a link's callback). They decode into the Message a worker runs, encode back to the
same fields, and an aqueue client's messages equal Celery's field by field (ids and times aside).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiormq
import pytest

from aqueue import App
from aqueue.broker.amqp import amqp_url
from aqueue.exceptions import DecodeError
from aqueue.message import Message, encode_message
from aqueue.protocol import CELERY, REPR_LIMIT, CeleryCodec, bounded_repr
from aqueue.serialization import get_serializer
from tests.conftest import AMQP_URL, Transport, transport_for

GOLDEN: dict[str, Any] = json.loads((Path(__file__).parent / "golden" / "celery.json").read_text())
MESSAGES: dict[str, dict[str, Any]] = GOLDEN["messages"]
TASK_MESSAGES = sorted(label for label, m in MESSAGES.items() if "task" in (m["headers"] or {}))
ACCEPT = frozenset({"application/json"})
JSON = get_serializer("json")
TIMES = {"eta", "expires"}
IDS = {"id", "root_id", "parent_id", "group", "origin"}
"""Header values that differ between any two sends: times, ids, and the sender's node name."""


def delivered(label: str, headers: dict[str, Any] | None = None, body: str | None = None) -> Message:
    """The golden message ``label`` as a worker decodes it (with ``headers``/``body`` instead, if given)."""
    captured = MESSAGES[label]
    properties = captured["properties"]
    return CELERY.decode(
        (body if body is not None else captured["body"]).encode(),
        properties["content_type"],
        headers if headers is not None else captured["headers"],
        ACCEPT,
        {"reply_to": properties.get("reply_to"), "priority": properties.get("priority")},
    )


def timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# Decoding what Celery sends ------------------------------------------------------------------------


@pytest.mark.parametrize("label", TASK_MESSAGES)
def test_every_captured_celery_message_decodes(label: str) -> None:
    # Given a message a Celery client or worker sent; when an aqueue worker decodes it
    message = delivered(label)
    headers = MESSAGES[label]["headers"]
    args, kwargs, embed = json.loads(MESSAGES[label]["body"])
    # Then it is the task and the call Celery sent, with its place in its workflow
    assert (message.id, message.task, list(message.args), message.kwargs) == (
        headers["id"],
        headers["task"],
        args,
        kwargs,
    )
    assert (message.retries, message.root, message.parent_id) == (
        headers["retries"],
        headers["root_id"],
        headers["parent_id"],
    )
    assert (message.group, message.group_index) == (headers["group"], headers["group_index"])
    assert (message.callbacks, message.errbacks, message.chain, message.chord) == (
        embed["callbacks"],
        embed["errbacks"],
        embed["chain"],
        embed["chord"],
    )
    assert message.reply_to == MESSAGES[label]["properties"].get("reply_to")


def test_call_options_decode_to_the_message_fields() -> None:
    # Given add.apply_async((2, 3), {'z': 1}, countdown=30, expires=60, priority=5, time_limit=10,
    # soft_time_limit=5, ignore_result=True, headers={'custom': 'value'}) sent by Celery
    message = delivered("options")
    headers = MESSAGES["options"]["headers"]
    # Then each option is where a worker reads it
    assert message.eta == timestamp(headers["eta"]) and message.expires == timestamp(headers["expires"])
    assert (message.priority, message.time_limit, message.soft_time_limit) == (5, 10, 5)
    assert message.ignore_result is True
    assert message.headers == {"custom": "value"}


def test_an_eta_decodes_to_its_instant() -> None:
    assert delivered("eta").eta == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


def test_a_worker_sent_retry_carries_its_count_and_due_time() -> None:
    message = delivered("worker_retry")
    assert message.retries == 1 and message.eta is not None
    assert message.parent_id == message.id  # Celery makes a retried task its own parent


def test_a_chain_is_the_rest_of_its_steps_last_first() -> None:
    chain = delivered("chain").chain
    assert chain is not None
    assert [step["args"] for step in chain] == [[4], [3]]
    # And the next step a Celery worker sent knows where it came from, with nothing left after it
    step = delivered("worker_chain_step")
    assert (step.chain, step.parent_id is not None, step.root_id is not None) == ([], True, True)


def test_a_link_carries_its_callbacks_and_errbacks() -> None:
    message = delivered("link")
    assert message.callbacks is not None and message.errbacks is not None
    assert [(s["task"], s["args"]) for s in message.callbacks] == [("goldtasks.add", [10])]
    assert [(s["task"], s["immutable"]) for s in message.errbacks] == [("goldtasks.on_error", True)]


def test_group_and_chord_members_know_their_place() -> None:
    first, second = delivered("group_0"), delivered("group_1")
    assert first.group == second.group is not None
    assert (first.group_index, second.group_index) == (0, 1)
    header = delivered("chord_0")
    assert header.chord is not None and header.chord["task"] == "goldtasks.tsum"


@pytest.mark.parametrize("label", TASK_MESSAGES)
def test_what_was_decoded_encodes_back_to_celerys_fields(label: str) -> None:
    # Given a captured message, decoded
    message = delivered(label)
    # When it is encoded again (as a worker does to retry it or give it back)
    body, headers = CELERY.encode(message, JSON)
    captured = MESSAGES[label]["headers"]
    # Then every header is Celery's (argsrepr aside: the decoded args are a list, Celery's were a tuple;
    # shadow is a display name aqueue does not keep), and so is the body
    different = {
        k for k in captured.keys() | (headers or {}).keys() if captured.get(k) != (headers or {}).get(k)
    }
    assert different <= {"origin", "argsrepr", "shadow"}
    assert json.loads(body) == json.loads(MESSAGES[label]["body"])


# What aqueue sends ---------------------------------------------------------------------------------


def celery_fields(label: str) -> dict[str, Any]:
    return {k: v for k, v in MESSAGES[label]["headers"].items() if k not in IDS | TIMES}


def aqueue_fields(message: Message) -> tuple[dict[str, Any], Any]:
    body, headers = CELERY.encode(message, JSON)
    assert headers is not None
    return {k: v for k, v in headers.items() if k not in IDS | TIMES}, json.loads(body)


def test_a_plain_call_is_celerys_message() -> None:
    # Given what add.delay(4, 4) makes in aqueue
    headers, body = aqueue_fields(Message("an-id", "goldtasks.add", (4, 4)))
    # Then its headers and body are those of Celery's add.delay(4, 4)
    assert headers == celery_fields("delay")
    assert body == json.loads(MESSAGES["delay"]["body"])


def test_a_call_with_options_is_celerys_message() -> None:
    # Given the options of the captured call, in an aqueue message (Celery's shadow aside)
    now = time.time()
    message = Message(
        "an-id",
        "goldtasks.add",
        (2, 3),
        {"z": 1},
        eta=now + 30,
        expires=now + 60,
        priority=5,
        time_limit=10,
        soft_time_limit=5,
        ignore_result=True,
        headers={"custom": "value"},
    )
    headers, body = aqueue_fields(message)
    assert headers == {k: v for k, v in celery_fields("options").items() if k != "shadow"} | {"shadow": None}
    assert body == json.loads(MESSAGES["options"]["body"])
    # And its times are ISO 8601 as Celery writes them
    _, full = CELERY.encode(message, JSON)
    assert full is not None and full["eta"] == datetime.fromtimestamp(now + 30, UTC).isoformat()


def test_the_sender_is_named_as_celery_names_it() -> None:
    _, headers = CELERY.encode(Message("an-id", "t"), JSON)
    assert headers is not None
    assert headers["origin"].startswith("gen") and "@" in headers["origin"]
    assert headers["root_id"] == "an-id"


@pytest.fixture
async def amqp(tmp_path: Path, unique: str) -> AsyncIterator[Transport]:
    async with transport_for("amqp", tmp_path, unique) as transport:
        yield transport


async def raw_messages(queue: str, n: int) -> list[aiormq.abc.DeliveredMessage]:
    connection = await aiormq.connect(amqp_url(AMQP_URL))
    try:
        channel = await connection.channel()
        return [await channel.basic_get(queue, no_ack=True) for _ in range(n)]
    finally:
        await connection.close()


async def test_on_rabbitmq_the_properties_and_headers_are_celerys(
    amqp: Transport, make_app: Callable[..., App]
) -> None:
    # Given an aqueue app on RabbitMQ with rpc:// results, and a Celery task of the same name
    app = make_app(amqp)
    # When it sends add.delay(4, 4), and a call with the captured options (but no countdown or expiry)
    await app.send_task("goldtasks.add", (4, 4))
    await app.send_task(
        "goldtasks.add",
        (2, 3),
        {"z": 1},
        priority=5,
        time_limit=10,
        soft_time_limit=5,
        ignore_result=True,
        headers={"custom": "value"},
    )
    plain, with_options = await raw_messages(amqp.queue, 2)
    # Then RabbitMQ holds Celery's properties (ids aside) and Celery's headers (ids and times aside)
    for got, label in ((plain, "delay"), (with_options, "options")):
        properties = got.header.properties
        assert properties.headers is not None
        celery = MESSAGES[label]["properties"]
        assert (properties.content_type, properties.content_encoding, properties.delivery_mode) == (
            celery["content_type"],
            celery["content_encoding"],
            celery["delivery_mode"],
        )
        assert properties.correlation_id == properties.headers["id"]
        assert properties.reply_to == app.backend.reply_to  # type: ignore[attr-defined]
        # (and the header by which aqueue's rpc:// client says it reads batched replies)
        expected = celery_fields(label) | {
            "eta": None,
            "expires": None,
            "shadow": None,
            "aqueue_rpc_batch": True,
        }
        assert {k: v for k, v in properties.headers.items() if k not in IDS} == expected
    assert plain.header.properties.priority == 0 and with_options.header.properties.priority == 5
    assert json.loads(plain.body) == json.loads(MESSAGES["delay"]["body"])


# Bad messages --------------------------------------------------------------------------------------


def with_header(label: str, **changes: Any) -> dict[str, Any]:
    return {**MESSAGES[label]["headers"], **changes}


@pytest.mark.parametrize(
    ("headers", "body", "named"),
    [
        (with_header("delay", id=""), None, "header 'id'"),
        (with_header("delay", task=7), None, "header 'task'"),
        (with_header("delay", eta="next tuesday"), None, "header 'eta' must be an ISO 8601"),
        (with_header("delay", expires=12), None, "header 'expires'"),
        (with_header("delay", retries=-1), None, "header 'retries'"),
        (with_header("delay", timelimit=["ten", None]), None, "header 'timelimit'"),
        (with_header("delay", group_index="first"), None, "header 'group_index'"),
        (with_header("delay", root_id=["x"]), None, "header 'root_id'"),
        (with_header("delay", ignore_result="yes"), None, "header 'ignore_result'"),
        (None, '{"args": [1]}', "the body must be [args, kwargs, embed]"),
        (None, "[1, {}, {}]", "args must be a list"),
        (None, "[[], [], {}]", "kwargs must be a mapping"),
        (None, "[[], {}, []]", "third item must be a mapping"),
        (None, '[[], {}, {"callbacks": {"task": "x"}}]', "'callbacks' must be a list of signatures"),
        (None, '[[], {}, {"chord": ["x"]}]', "'chord' must be a signature"),
    ],
)
def test_a_bad_field_is_a_decode_error_that_names_it(
    headers: dict[str, Any] | None, body: str | None, named: str
) -> None:
    with pytest.raises(DecodeError, match="Not a Celery task message") as caught:
        delivered("delay", headers, body)
    assert named in str(caught.value)


def test_a_compressed_body_is_refused_with_what_to_do() -> None:
    with pytest.raises(DecodeError, match=r"compressed .*'application/x-gzip'.*without task_compression"):
        delivered("delay", with_header("delay", compression="application/x-gzip"))


def test_a_bad_priority_is_named() -> None:
    captured = MESSAGES["delay"]
    with pytest.raises(DecodeError, match="bad priority 300"):
        CELERY.decode(
            captured["body"].encode(), "application/json", captured["headers"], ACCEPT, {"priority": 300}
        )


def test_headers_rabbitmq_adds_are_not_custom_headers() -> None:
    headers = with_header("delay", **{"x-death": [{"count": 1}], "x-first-death-queue": "q", "mine": 1})
    assert delivered("delay", headers).headers == {"mine": 1}


def test_a_message_without_celerys_headers_is_read_as_aqueues_native_layout() -> None:
    body = encode_message(Message("native-id", "tasks.add", (1, 2)), JSON)
    message = CELERY.decode(body, "application/json", None, ACCEPT)
    assert (message.id, message.task, list(message.args)) == ("native-id", "tasks.add", [1, 2])


def test_a_naive_eta_is_read_in_the_codecs_zone() -> None:
    oslo = timezone(timedelta(hours=1))
    codec = CeleryCodec(zone=oslo)
    captured = MESSAGES["delay"]
    headers = with_header("delay", eta="2030-01-01T12:00:00")
    message = codec.decode(captured["body"].encode(), "application/json", headers, ACCEPT)
    assert message.eta == datetime(2030, 1, 1, 12, tzinfo=oslo).timestamp()


# argsrepr ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [(4, 4), (), {}, {"z": 1}, ("text", 1.5, None, True), [1, 2]])
def test_small_arguments_are_their_repr(value: Any) -> None:
    assert bounded_repr(value) == repr(value)


@pytest.mark.parametrize(
    "value",
    [
        (list(range(1_000_000)),),
        ("x" * 1_000_000,),
        ([[[[[[[[1]]]]]]]],),
        {f"k{i}": i for i in range(10_000)},
        tuple(range(5000)),
    ],
    ids=["long-list", "long-string", "deep", "many-kwargs", "many-args"],
)
def test_big_arguments_are_cut_short_quickly(value: Any) -> None:
    started = time.perf_counter()
    text = bounded_repr(value)
    assert len(text) <= REPR_LIMIT
    assert time.perf_counter() - started < 0.05
