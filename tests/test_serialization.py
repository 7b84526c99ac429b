"""Content types: JSON by default, msgpack, and pickle only where accept_content names it."""

from __future__ import annotations

import pickle

import pytest

from aqueue.exceptions import ContentDisallowed, DecodeError, EncodeError, ImproperlyConfigured
from aqueue.serialization import Serializer, accepted_content_types, get_serializer, serializer_for

JSON, MSGPACK, PICKLE = "application/json", "application/x-msgpack", "application/x-python-serialize"


@pytest.mark.parametrize(("name", "content_type"), [("json", JSON), ("msgpack", MSGPACK), ("pickle", PICKLE)])
def test_serializers_by_name_and_by_content_type(name: str, content_type: str) -> None:
    by_name = get_serializer(name)
    assert (by_name.name, by_name.content_type) == (name, content_type)
    assert get_serializer(content_type) is by_name


def test_unknown_serializer_names_the_choices() -> None:
    with pytest.raises(ImproperlyConfigured, match="'yaml': use one of json, msgpack, pickle"):
        get_serializer("yaml")


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_round_trip(name: str) -> None:
    serializer = get_serializer(name)
    value = {"id": "x", "args": [1, 2.5, "three", None, True], "kwargs": {"k": [1, {"n": 2}]}}
    assert serializer.decode(serializer.encode(value)) == value


def test_json_encodes_tuples_as_lists() -> None:
    json = get_serializer("json")
    assert json.decode(json.encode({"args": (4, 4)})) == {"args": [4, 4]}


def test_encode_error_names_the_serializer() -> None:
    with pytest.raises(EncodeError, match="cannot be serialized with json"):
        get_serializer("json").encode({"x": object()})


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_decode_error_on_bytes_that_are_not_the_content_type(name: str) -> None:
    with pytest.raises(DecodeError, match=f"Cannot decode {name} content"):
        get_serializer(name).decode(b"\xc1\x00not it")


def test_accept_content_takes_names_or_content_types() -> None:
    assert accepted_content_types(["json", MSGPACK]) == frozenset({JSON, MSGPACK})
    assert accepted_content_types([]) == frozenset()


def test_serializer_for_an_accepted_content_type() -> None:
    assert serializer_for(JSON, accepted_content_types(["json"])) is get_serializer("json")


def test_pickle_is_refused_unless_accept_content_names_it() -> None:
    # Given the default accept_content, when a pickle message comes in, then it is refused by name
    with pytest.raises(ContentDisallowed, match=r"'application/x-python-serialize'.*accept_content"):
        serializer_for(PICKLE, accepted_content_types(["json"]))
    # And when accept_content names pickle, then it is used
    assert serializer_for(PICKLE, accepted_content_types(["json", "pickle"])).loads is pickle.loads


def test_unknown_content_type_is_refused() -> None:
    with pytest.raises(ContentDisallowed):
        serializer_for("text/yaml", accepted_content_types(["json"]))
    with pytest.raises(DecodeError, match="Unknown content type"):
        serializer_for("text/yaml", frozenset({"text/yaml"}))


def test_serializer_is_a_frozen_value() -> None:
    serializer = Serializer("x", "application/x", lambda v: b"", lambda b: None)
    assert serializer.encode(1) == b"" and serializer.decode(b"") is None
