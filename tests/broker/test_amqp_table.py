"""AMQP field tables: encoded as py-amqp (Celery's client) encodes them, decoded as pamqp decodes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import amqp.serialization
import pamqp.decode
import pamqp.encode
import pytest

from aqueue.broker import amqp_table
from aqueue.broker.amqp_table import UNREADABLE_HEADERS, decode_field_table, encode_table
from aqueue.message import Message
from aqueue.protocol import CeleryCodec

HEADERS: dict[str, Any] = {
    "text": "x", "none": None, "small": 5, "big": 2**40, "negative": -(2**31), "float": 0.1, "flag": True,
    "list": [None, 1, "x"], "table": {"k": [1.25]}, "tuple": (1, 2), "bytes": b"raw",
    "decimal": Decimal("1.25"), "time": datetime(2030, 1, 1, tzinfo=UTC),
}  # fmt: skip
GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "celery.json").read_text())["messages"]


def test_headers_are_laid_out_as_py_amqp_lays_them_out() -> None:
    # Given headers of every type a field table carries; then the table is Celery's client's, byte for byte
    assert encode_table(HEADERS) == amqp.serialization.dumps("F", [HEADERS])


def test_a_value_no_field_type_carries_is_named() -> None:
    with pytest.raises(TypeError, match="AMQP header 'what': no AMQP field type for object"):
        encode_table({"what": object()})


def test_headers_with_a_shared_block_encode_as_the_plain_mapping_would() -> None:
    # Given the headers of two messages of one task, which share the task's encoded block
    codec = CeleryCodec()
    first = codec.headers(Message("id-1", "tasks.add", (1, 2)))
    second = codec.headers(Message("id-2", "tasks.add", (3, 4), eta=1.5e9, headers={"custom": 1}))
    # Then each encodes as the same mapping without the block would
    for headers in (first, second):
        assert encode_table(headers) == amqp.serialization.dumps("F", [dict(headers)])


# Decoding: the same as pamqp's own decoder, faster --------------------------------------------------


@pytest.fixture
def pamqps() -> Iterator[Any]:
    """pamqp's own field_table, with its own decoders for nested tables and arrays while it runs."""
    own: dict[str, Any] = {"table": pamqp.decode.field_table, "array": pamqp.decode.field_array}

    def decode(data: bytes) -> Any:
        saved = dict(pamqp.decode.METHODS), dict(pamqp.decode.TABLE_MAPPING)
        pamqp.decode.METHODS.update(own)
        pamqp.decode.TABLE_MAPPING.update({b"F": own["table"], b"A": own["array"]})
        try:
            return pamqp.decode.field_table(data)
        finally:
            pamqp.decode.METHODS.update(saved[0])
            pamqp.decode.TABLE_MAPPING.update(saved[1])

    yield decode


def pamqp_types() -> bytes:
    """A table with every field type pamqp writes (b, s, u, i, l, f, D, T, x, ...)."""
    table: Any = {
        "b": -5, "s": -300, "u": 60000, "I": -70000, "i": 3_000_000_000, "l": 2**40, "f": 0.5, "D": Decimal("3.14"),
        "T": datetime(2030, 1, 1, tzinfo=UTC), "x": bytearray(b"\x00\xff"), "S": "é", "V": None, "t": False,
        "A": [1, "x", [None]], "F": {"nested": {"deep": [1.5]}},
    }  # fmt: skip
    return pamqp.encode.field_table(table)


def samples() -> list[bytes]:
    celery = [encode_table(m["headers"]) for m in GOLDEN.values() if m["headers"]]
    non_utf8 = b"\x00\x00\x00\x08\x01kS\x00\x00\x00\x01\xff"
    return [encode_table(HEADERS), pamqp_types(), non_utf8, *celery, b"\x00\x00\x00\x00"]


@pytest.mark.parametrize("data", samples(), ids=lambda d: f"{len(d)}-bytes")
def test_tables_decode_as_pamqp_decodes_them(data: bytes, pamqps: Any) -> None:
    # Given a table, followed by other bytes (as the properties after it in a content header)
    assert decode_field_table(data + b"tail") == pamqps(data + b"tail")


@pytest.mark.parametrize(
    "data", [*samples()[:3], b"\x00\x00\x00\x03\x01kt"], ids=["ours", "pamqps", "non-utf8", "flag-cut"]
)
def test_cut_or_corrupt_tables_fail_as_pamqps_do(data: bytes, pamqps: Any) -> None:
    # Given every cut of a table, and every byte of it replaced by a bad one
    broken = [data[:cut] for cut in range(len(data) + 1)]
    broken += [data[:i] + bytes([0xFE]) + data[i + 1 :] for i in range(len(data))]
    for value in broken:
        # Then both decoders give the same table, or both raise ValueError; where pamqp meets a name
        # that is not UTF-8, ours gives the one marker header instead of failing the connection
        try:
            expected: Any = pamqps(value)
        except UnicodeDecodeError:
            size = int.from_bytes(value[:4], "big")
            expected = (size + 4, {UNREADABLE_HEADERS: value[4 : size + 4]})
        except ValueError:
            expected = ValueError
        try:
            got: Any = decode_field_table(value)
        except ValueError:
            got = ValueError
        assert got == expected, value


def test_pamqp_decodes_with_it_once_installed() -> None:
    # Given the AMQP broker imported (it installs the decoder)
    import aqueue.broker.amqp  # noqa: F401

    # Then pamqp's dispatch tables hold it, and installing again changes nothing
    assert pamqp.decode.METHODS["table"] is decode_field_table
    assert pamqp.decode.TABLE_MAPPING[b"F"] is decode_field_table
    assert amqp_table.install() is True
