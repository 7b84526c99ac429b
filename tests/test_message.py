"""The task message: compact encoding, decoding that refuses what is not a task, errors naming arguments."""

from __future__ import annotations

import pytest

from aqueue.exceptions import ContentDisallowed, DecodeError, EncodeError
from aqueue.message import Envelope, Message, decode_message, encode_message
from aqueue.serialization import accepted_content_types, get_serializer

JSON = get_serializer("json")
ACCEPT = accepted_content_types(["json", "msgpack"])


def test_to_dict_leaves_out_empty_optional_fields() -> None:
    assert Message("id-1", "tasks.add", (4, 4)).to_dict() == {
        "id": "id-1",
        "task": "tasks.add",
        "args": (4, 4),
        "kwargs": {},
    }


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_encode_then_decode_gives_the_same_message(serializer: str) -> None:
    # Given a message with every field set
    message = Message(
        "id-2",
        "tasks.add",
        [1, 2],
        {"z": 3},
        retries=2,
        eta=1700000000.5,
        expires=1700000100.0,
        ignore_result=True,
        reply_to="reply-q",
        headers={"h": "v"},
        priority=3,
        time_limit=10.0,
        soft_time_limit=None,
        root_id="root",
        parent_id="parent",
        group="g",
        group_index=0,
        callbacks=[{"task": "tasks.cb", "args": [], "kwargs": {}, "options": {}}],
        errbacks=[{"task": "tasks.err", "args": [], "kwargs": {}, "options": {}}],
        chain=[{"task": "tasks.next", "args": [], "kwargs": {}, "options": {}}],
        chord={"task": "tasks.body", "args": [], "kwargs": {}, "options": {}, "chord_size": 2},
    )
    codec = get_serializer(serializer)
    # When it is encoded and decoded
    decoded = decode_message(encode_message(message, codec), codec.content_type, ACCEPT)
    # Then every field comes back
    assert decoded == message


def test_decoded_defaults() -> None:
    decoded = decode_message(b'{"id": "a", "task": "t"}', JSON.content_type, ACCEPT)
    assert decoded == Message("a", "t", (), {})
    assert decoded.root == "a" and decoded.parent_id is None


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'"just a string"',
        b"42",
        b'{"task": "tasks.add"}',
        b'{"id": "x"}',
        b'{"id": 1, "task": "tasks.add"}',
        b'{"id": "x", "task": "t", "args": "ab"}',
        b'{"id": "x", "task": "t", "kwargs": [1]}',
    ],
)
def test_bodies_that_are_not_task_messages_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError, match="Not a task message"):
        decode_message(body, JSON.content_type, ACCEPT)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retries", "1"),
        ("retries", True),
        ("retries", -1),
        ("retries", 1.5),
        ("eta", "soon"),
        ("eta", [1]),
        ("eta", False),
        ("expires", "tomorrow"),
        ("expires", {"at": 1}),
        ("expires", float("nan")),
        ("expires", float("inf")),
        ("expires", 10**400),
        ("timelimit", "10"),
        ("timelimit", [1, 2, 3]),
        ("timelimit", ["a", None]),
        ("ignore_result", "no"),
        ("reply_to", 7),
        ("headers", [1, 2]),
        ("headers", "h"),
    ],
)
def test_an_optional_field_of_the_wrong_type_raises_decode_error_naming_it(field: str, value: object) -> None:
    # Given a task message whose field has a type the worker cannot use
    body = JSON.dumps({"id": "x", "task": "t", field: value})
    # When it is decoded, then the error names the field
    with pytest.raises(DecodeError, match=f"Not a task message \\(x\\): bad '{field}' field"):
        decode_message(body, JSON.content_type, ACCEPT)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retries", 3),
        ("eta", 1700000000),
        ("eta", None),
        ("expires", 1700000000.5),
        ("timelimit", [None, 30]),
        ("timelimit", [1.5, 2]),
        ("ignore_result", False),
        ("reply_to", None),
        ("headers", {"a": 1}),
        ("headers", None),
    ],
)
def test_optional_fields_of_the_right_type_are_accepted(field: str, value: object) -> None:
    body = JSON.dumps({"id": "x", "task": "t", field: value})
    assert decode_message(body, JSON.content_type, ACCEPT).id == "x"


def test_garbage_bytes_raise_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_message(b"\x00\xff\xfe", JSON.content_type, ACCEPT)


def test_content_outside_accept_content_is_refused_before_decoding() -> None:
    with pytest.raises(ContentDisallowed):
        decode_message(b"\x80\x04K\x01.", "application/x-python-serialize", ACCEPT)


def test_encode_error_names_the_positional_argument_and_serializer() -> None:
    message = Message("x", "tasks.add", (1, object()))
    with pytest.raises(EncodeError) as raised:
        encode_message(message, JSON)
    text = str(raised.value)
    assert "tasks.add" in text and "positional argument 1 (object)" in text and "with json" in text
    assert isinstance(raised.value.__cause__, Exception)


class _Opaque:
    pass


def test_encode_error_names_the_keyword_argument() -> None:
    message = Message("x", "tasks.add", (1,), {"ok": 1, "when": _Opaque()})
    with pytest.raises(EncodeError, match=r"keyword argument 'when' \(_Opaque\)"):
        encode_message(message, JSON)


def test_encode_error_without_a_culprit_argument() -> None:
    # Given a message whose headers, not arguments, cannot be encoded
    message = Message("x", "tasks.add", (1,), headers={"bad": object()})
    with pytest.raises(EncodeError, match="the message cannot be serialized with json"):
        encode_message(message, JSON)


def test_envelope_is_frozen() -> None:
    envelope = Envelope("id", "celery", b"{}", JSON.content_type)
    assert (envelope.eta, envelope.priority) == (None, None)
    with pytest.raises(AttributeError):
        envelope.queue = "other"  # type: ignore[misc]
