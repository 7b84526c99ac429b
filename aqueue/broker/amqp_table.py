"""AMQP field tables (message headers): encoded as py-amqp encodes them, decoded faster than pamqp does.

Encoding follows py-amqp, the library Celery's clients and workers speak AMQP with, so that a header
table aqueue sends is byte for byte the one Celery would send: in the mapping's order, floats as
doubles (pamqp writes 32-bit floats), integers as 32 bits (``I``) or 64 (``L``), ``bytes`` as strings,
tuples as arrays. The headers a task's messages share (:class:`~aqueue.protocol.HeaderBlock`) are encoded
once per task, and only the rest per message.

Decoding: aiormq decodes every content header it receives with pamqp, whose field-table decoder
slices the bytes and makes several calls per field; a Celery task message has twenty header fields,
which made the header frame cost several times the rest of a delivery. :func:`install` has pamqp use
:func:`decode_field_table` instead, which returns what pamqp's returns (the same values and types, the
same ``ValueError`` on bad data) at a fraction of the cost. It replaces two entries of pamqp's
dispatch tables (``pamqp.decode.METHODS['table']``, ``TABLE_MAPPING[b'F']``, and the same for arrays),
only when they still hold pamqp's own functions; pamqp's minor version is pinned in ``pyproject.toml``
for that, and tests/broker/test_amqp_table.py compares both decoders on every field type and on
truncated and corrupt tables.
"""

from __future__ import annotations

import calendar
import datetime as _datetime
import decimal
import itertools
import struct
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from aqueue.protocol import TaskHeaders

__all__ = ["decode_field_table", "encode_table", "install", "table_at"]

_OCTET = struct.Struct(">B")
_UINT = struct.Struct(">I")
_INT = struct.Struct(">i")
_LONG = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")
_TIMESTAMP = struct.Struct(">Q")
_DECIMAL = struct.Struct(">Bi")
_MAX_KEYS = 4096
"""Header names kept encoded; past this the cache restarts."""


def encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table, laid out as py-amqp lays it out (see the module docstring).

    Raises:
        TypeError: a value no AMQP field type carries (the key is named).
    """
    if type(table) is TaskHeaders:
        block = table.block
        shared = block.encoded
        if shared is None:
            shared = block.encoded = _fields(block.items.items())
        data = shared + _fields(itertools.islice(table.items(), len(block.items), None))
    else:
        data = _fields(table.items())
    return _UINT.pack(len(data)) + data


_KEYS: dict[str, bytes] = {}
"""Each header name as a short string (names are few: Celery's, plus the callers' own headers)."""


def _fields(items: Iterable[tuple[str, Any]]) -> bytes:
    # The hot path: strings and None inline, the rest through _value().
    keys, parts = _KEYS, list[bytes]()
    append = parts.append
    for key, value in items:
        name = keys.get(key)
        if name is None:
            if len(keys) >= _MAX_KEYS:
                keys.clear()
            raw = key.encode("utf-8", "surrogatepass")
            name = keys[key] = _OCTET.pack(len(raw)) + raw
        append(name)
        if type(value) is str:
            data = value.encode("utf-8", "surrogatepass")
            append(b"S")
            append(_UINT.pack(len(data)))
            append(data)
        elif value is None:
            append(b"V")
        else:
            try:
                append(_value(value))
            except TypeError as exc:
                raise TypeError(f"AMQP header {key!r}: {exc}") from None
    return b"".join(parts)


def _value(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        data: bytes = value.encode("utf-8", "surrogatepass")
        return b"S" + _UINT.pack(len(data)) + data
    if value is None:
        return b"V"
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int:
        return b"I" + _INT.pack(value) if -2147483647 <= value <= 2147483647 else b"L" + _LONG.pack(value)
    if kind is float:
        return b"d" + _DOUBLE.pack(value)
    if kind is list or kind is tuple:
        data = b"".join([_value(item) for item in value])
        return b"A" + _UINT.pack(len(data)) + data
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    return _other(value)


def _other(value: Any) -> bytes:
    if isinstance(value, bool):
        return _value(bool(value))
    if isinstance(value, str):
        return _value(str(value))
    if isinstance(value, int):
        return _value(int(value))
    if isinstance(value, float):
        return _value(float(value))
    if isinstance(value, bytes):
        return b"S" + _UINT.pack(len(value)) + value
    if isinstance(value, bytearray):
        return b"x" + _UINT.pack(len(value)) + bytes(value)
    if isinstance(value, list | tuple):
        return _value(list(value))
    if isinstance(value, Decimal):
        sign, digits, exponent = value.as_tuple()
        number = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
        return b"D" + _DECIMAL.pack(-int(exponent), number)
    if isinstance(value, datetime):
        return b"T" + _TIMESTAMP.pack(calendar.timegm(value.utctimetuple()))
    raise TypeError(f"no AMQP field type for {type(value).__name__} {value!r:.60}")


# Decoding -------------------------------------------------------------------------------------------

_Reader = Callable[[bytes, int], tuple[Any, int]]

UNREADABLE_HEADERS = "x-aqueue-unreadable-headers"
"""The only header of a message whose header table is not UTF-8 text; its value is the raw table."""


def decode_field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """pamqp's ``decode.field_table``: the bytes a table at the start of ``value`` takes, and the table.

    Raises:
        ValueError: ``value`` does not start with a whole field table.
    """
    table, end = table_at(value, 0)
    return end, table


def table_at(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """:func:`decode_field_table` of the table at ``pos`` in ``data``: the table, and where it ends.

    Raises:
        ValueError: no whole field table is at ``pos``.
    """
    try:
        return _table(data, pos)
    except (struct.error, TypeError, IndexError) as err:
        raise ValueError("Could not unpack data") from err
    except UnicodeDecodeError:  # a name that is not UTF-8: one marker instead of failing the connection
        size = int.from_bytes(data[pos : pos + 4], "big")
        return {UNREADABLE_HEADERS: data[pos + 4 : pos + 4 + size]}, pos + 4 + size


def decode_field_array(value: bytes) -> tuple[int, list[Any]]:
    """pamqp's ``decode.field_array``: the bytes an array at the start of ``value`` takes, and the array.

    Raises:
        ValueError: ``value`` does not start with a whole field array.
    """
    try:
        array, end = _array(value, 0)
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err
    return end, array


_NAMES: dict[bytes, str] = {}
"""Each header name read, by its bytes (names are few, as for _KEYS)."""


def _table(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    (length,) = _UINT.unpack_from(data, pos)
    pos += 4
    end = pos + length
    if end > len(data):
        raise ValueError("Field table length exceeds available data")
    table: dict[str, Any] = {}
    readers, size, names, uint = _READERS, len(data), _NAMES, _UINT.unpack_from
    while pos < end:
        name_end = pos + 1 + data[pos]
        if name_end > end:
            raise ValueError("Field table key length exceeds data")
        raw = data[pos + 1 : name_end]
        key = names.get(raw)
        if key is None:
            if len(names) >= _MAX_KEYS:
                names.clear()
            key = names[raw] = raw.decode("utf-8")
        pos = name_end
        if pos >= size:
            table[key] = None  # pamqp reads nothing as None
            continue
        kind = data[pos]
        # The types of Celery's headers inline: S (strings), V (None), I (counts), t (flags).
        if kind == 0x53:
            start = pos + 5
            pos = start + uint(data, pos + 1)[0]
            raw = data[start:pos]
            try:
                table[key] = raw.decode("utf-8")
            except UnicodeDecodeError:
                table[key] = raw
        elif kind == 0x56:
            table[key] = None
            pos += 1
        elif kind == 0x49:
            (table[key],) = _INT.unpack_from(data, pos + 1)
            pos += 5
        elif kind == 0x74:
            table[key] = data[pos + 1] != 0
            pos += 2
        else:
            reader = readers.get(kind)
            if reader is None:
                raise ValueError(f"Unknown type: {data[pos : pos + 1]!r}")
            table[key], pos = reader(data, pos + 1)
    return table, end


def _array(data: bytes, pos: int) -> tuple[list[Any], int]:
    (length,) = _UINT.unpack_from(data, pos)
    pos += 4
    end = pos + length
    if end > len(data):
        raise ValueError("Field array length exceeds available data")
    array, readers = [], _READERS
    while pos < end:
        reader = readers.get(data[pos])
        if reader is None:
            raise ValueError(f"Unknown type: {data[pos : pos + 1]!r}")
        item, pos = reader(data, pos + 1)
        array.append(item)
    return array, pos


def _fixed(form: str) -> _Reader:
    layout = struct.Struct(form)
    unpack, size = layout.unpack_from, layout.size

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        return unpack(data, pos)[0], pos + size

    return read


def _boolean(data: bytes, pos: int) -> tuple[Any, int]:
    return bool(_OCTET.unpack_from(data, pos)[0]), pos + 1


def _string(data: bytes, pos: int) -> tuple[Any, int]:
    (length,) = _UINT.unpack_from(data, pos)
    raw = data[pos + 4 : pos + 4 + length]
    try:
        return raw.decode("utf-8"), pos + 4 + length
    except UnicodeDecodeError:
        return raw, pos + 4 + length


def _bytes(data: bytes, pos: int) -> tuple[Any, int]:
    (length,) = _UINT.unpack_from(data, pos)
    return bytearray(data[pos + 4 : pos + 4 + length]), pos + 4 + length


def _decimal(data: bytes, pos: int) -> tuple[Any, int]:
    decimals, raw = _OCTET.unpack_from(data, pos)[0], _INT.unpack_from(data, pos + 1)[0]
    return decimal.Decimal(raw) * (decimal.Decimal(10) ** -decimals), pos + 5


def _timestamp(data: bytes, pos: int) -> tuple[Any, int]:
    (stamp,) = _TIMESTAMP.unpack_from(data, pos)
    seconds = stamp / 1000.0 if stamp > 0xFFFFFFFF else stamp  # pamqp: past 2106 it is milliseconds
    return _datetime.datetime.fromtimestamp(seconds, tz=_datetime.UTC), pos + 8


def _void(data: bytes, pos: int) -> tuple[Any, int]:
    return None, pos


_READERS: dict[int, _Reader] = {
    ord("t"): _boolean,
    ord("b"): _fixed(">b"),
    ord("B"): _fixed(">B"),
    ord("s"): _fixed(">h"),
    ord("u"): _fixed(">H"),
    ord("I"): _fixed(">l"),
    ord("i"): _fixed(">L"),
    ord("l"): _fixed(">q"),
    ord("L"): _fixed(">q"),
    ord("f"): _fixed(">f"),
    ord("d"): _fixed(">d"),
    ord("D"): _decimal,
    ord("S"): _string,
    ord("A"): lambda data, pos: _array(data, pos),
    ord("T"): _timestamp,
    ord("F"): lambda data, pos: _table(data, pos),
    ord("V"): _void,
    0: _void,
    ord("x"): _bytes,
}
"""One reader per field type, as pamqp's TABLE_MAPPING (RabbitMQ's errata types)."""


def install() -> bool:
    """Have pamqp decode field tables and arrays with :func:`decode_field_table` / :func:`decode_field_array`.

    Only while pamqp's dispatch tables still hold its own decoders; returns whether they now hold ours.
    """
    from pamqp import decode

    methods, mapping = decode.METHODS, decode.TABLE_MAPPING
    ours = (decode_field_table, decode_field_array)
    if (methods.get("table"), methods.get("array")) == ours:
        return True
    theirs = (decode.field_table, decode.field_array)
    if (methods.get("table"), methods.get("array")) != theirs or (
        mapping.get(b"F"),
        mapping.get(b"A"),
    ) != theirs:
        return False
    methods["table"], methods["array"] = ours
    mapping[b"F"], mapping[b"A"] = ours
    return True
