"""Basic.Deliver and the content header's properties: decoded as pamqp decodes them (the generic way)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from pamqp import base, commands, frame, header
from pamqp.exceptions import UnmarshalingException

from aqueue.broker import amqp_frames
from aqueue.broker.amqp_consumer import eta_of  # noqa: F401  (importing the consumer installs the decoders)
from aqueue.message import Message
from aqueue.protocol import CeleryCodec

PROPERTIES: dict[str, Any] = {
    "content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2, "priority": 9,
    "correlation_id": "c" * 36, "reply_to": "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAx", "expiration": "60000",
    "message_id": "m-1", "timestamp": datetime(2030, 1, 1, tzinfo=UTC), "message_type": "t", "user_id": "guest",
    "app_id": "aqueue", "cluster_id": "",
}  # fmt: skip


def celery_headers() -> dict[str, Any]:
    message = Message("id-1", "tasks.add", (1, 2), {"z": "é"}, eta=1.9e9, retries=2, parent_id="p")
    return dict(CeleryCodec().headers(message))


def generic_properties(flags: int, data: bytes) -> commands.Basic.Properties:
    properties = commands.Basic.Properties()
    base.BasicProperties.unmarshal(properties, flags, data)
    return properties


def ours_properties(flags: int, data: bytes) -> commands.Basic.Properties:
    properties = commands.Basic.Properties()
    amqp_frames.unmarshal_properties(properties, flags, data)
    return properties


def header_payload(**properties: Any) -> tuple[int, bytes]:
    """The flags and property bytes of a content header frame holding ``properties``."""
    marshaled = header.ContentHeader(0, 5, commands.Basic.Properties(**properties)).marshal()
    payload = marshaled[12:]  # after class, weight and body size
    flags = int.from_bytes(payload[:2], "big")
    return flags, payload[2:]


def fields(properties: commands.Basic.Properties) -> dict[str, Any]:
    return {name: getattr(properties, name) for name in properties.__slots__}


def test_the_decoders_are_installed() -> None:
    assert amqp_frames.install()
    assert commands.Basic.Properties.unmarshal is amqp_frames.unmarshal_properties
    assert commands.Basic.Deliver.unmarshal is amqp_frames.unmarshal_deliver


@pytest.mark.parametrize("case", ["every property", "celery headers", "none", "some"])
def test_properties_decode_as_pamqp_decodes_them(case: str) -> None:
    given = {
        "every property": {**PROPERTIES, "headers": celery_headers()},
        "celery headers": {
            "content_type": "application/json",
            "headers": celery_headers(),
            "delivery_mode": 2,
        },
        "none": {},
        "some": {"priority": 0, "reply_to": "r", "headers": {}},
    }[case]
    flags, data = header_payload(**given)
    ours, theirs = fields(ours_properties(flags, data)), fields(generic_properties(flags, data))
    assert ours == theirs
    assert {k: ours[k] for k in given} == given


def test_text_that_is_not_utf8_is_read_with_backslash_escapes() -> None:
    flags, data = header_payload(correlation_id="abc", app_id="x")
    data = data.replace(b"abc", b"a\xffc")
    assert ours_properties(flags, data).correlation_id == "a\\xffc"


def test_truncated_properties_raise_value_error_or_decode_as_pamqp() -> None:
    flags, data = header_payload(**PROPERTIES, headers=celery_headers())
    for cut in range(len(data)):
        try:
            ours = fields(ours_properties(flags, data[:cut]))
        except ValueError:
            continue
        assert ours == fields(generic_properties(flags, data[:cut]))


def test_random_property_sets_decode_as_pamqp() -> None:
    rng = random.Random(7)
    names = list(PROPERTIES)
    for _ in range(200):
        given = {name: PROPERTIES[name] for name in rng.sample(names, rng.randint(0, len(names)))}
        if rng.random() < 0.5:
            given["headers"] = {"k": rng.randint(-5, 5), "s": "é" * rng.randint(0, 3)}
        flags, data = header_payload(**given)
        assert fields(ours_properties(flags, data)) == fields(generic_properties(flags, data))


@pytest.mark.parametrize("redelivered", [False, True])
def test_basic_deliver_decodes_as_pamqp(redelivered: bool) -> None:
    method = commands.Basic.Deliver("ctag-é", 2**40 + 3, redelivered, "celery", "tasks.q")
    raw = frame.marshal(method, 1)
    _, _, decoded = frame.unmarshal(raw)  # through pamqp's frame reader, so with what is installed
    generic = commands.Basic.Deliver()
    base.Frame.unmarshal(generic, raw[7 + 4 : -1])
    expected = ("ctag-é", 2**40 + 3, redelivered, "celery", "tasks.q")
    for got in (decoded, generic):
        assert isinstance(got, commands.Basic.Deliver)
        assert (
            got.consumer_tag,
            got.delivery_tag,
            got.redelivered,
            got.exchange,
            got.routing_key,
        ) == expected


def test_a_truncated_basic_deliver_raises_value_error_or_decodes_as_pamqp() -> None:
    payload = frame.marshal(commands.Basic.Deliver("ctag", 7, True, "ex", "q"), 1)[7 + 4 : -1]
    names = commands.Basic.Deliver.__slots__
    for cut in range(len(payload)):
        ours, generic = commands.Basic.Deliver(), commands.Basic.Deliver()
        try:
            amqp_frames.unmarshal_deliver(ours, payload[:cut])
        except ValueError:
            continue
        base.Frame.unmarshal(generic, payload[:cut])
        assert [getattr(ours, n) for n in names] == [getattr(generic, n) for n in names]


def test_a_frame_that_does_not_decode_is_pamqps_unmarshaling_error() -> None:
    raw = frame.marshal(commands.Basic.Deliver("ctag", 7, False, "", "q"), 1)
    payload = raw[7:-1][:-3]  # the routing key cut short
    with pytest.raises(UnmarshalingException):
        frame.unmarshal(raw[:3] + len(payload).to_bytes(4, "big") + payload + b"\xce")
