"""The two frames every delivery brings, decoded faster than pamqp decodes them: ``Basic.Deliver`` and
the content header's properties.

pamqp decodes both generically: for each field it looks up the field's type, calls a decoder through
a dispatch table, and slices the rest of the frame off into a new ``bytes`` (a Celery task message's
properties carry a header table of twenty fields, so the header frame is copied about twenty times).
:func:`install` gives ``pamqp.commands.Basic.Deliver`` and ``Basic.Properties`` an ``unmarshal`` of their
own that reads the frame in one pass, by offset, and sets the same attributes to the same values:
strings that are not UTF-8 are read as aqueue's consumer reads them everywhere (backslash escapes),
header tables by :mod:`aqueue.broker.amqp_table`, and bad data raises ``ValueError`` (which pamqp turns
into its ``UnmarshalingException``), as pamqp's own does. Only while both classes still use pamqp's
generic ``unmarshal`` (pamqp's minor version is pinned in ``pyproject.toml``); tests/broker/test_amqp_frames.py
compares both decoders on every property and on truncated frames.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import base, commands, decode

from aqueue.broker.amqp_table import table_at

__all__ = ["install", "unmarshal_deliver", "unmarshal_properties"]

_DELIVERY = struct.Struct(">QB")
"""``Basic.Deliver``'s delivery tag and its bit field (``redelivered`` is bit 0)."""

_LAYOUT: tuple[tuple[str, int, str], ...] = ()
"""Each property's name, flag and AMQP type, in the order they are laid out (read from pamqp by install)."""


def _short(data: bytes, pos: int) -> tuple[str, int]:
    end = pos + 1 + data[pos]
    if end > len(data):
        raise ValueError("Could not unpack short string value")
    raw = data[pos + 1 : end]
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="backslashreplace"), end


def unmarshal_properties(self: Any, flags: int, data: bytes) -> None:
    """``Basic.Properties.unmarshal``: set the properties ``flags`` says ``data`` holds.

    Raises:
        ValueError: ``data`` does not hold them all.
    """
    pos = 0
    try:
        for name, flag, kind in _LAYOUT:
            if not flags & flag:
                continue
            value: Any
            if kind == "shortstr":
                value, pos = _short(data, pos)
            elif kind == "table":
                value, pos = table_at(data, pos)
            elif kind == "octet":
                value = data[pos]
                pos += 1
            else:  # the timestamp, which Celery does not send
                used, value = decode.by_type(data[pos:], kind)
                pos += used
            setattr(self, name, value)
    except (IndexError, struct.error) as err:
        raise ValueError("Could not unpack the content header's properties") from err


def unmarshal_deliver(self: Any, data: bytes) -> None:
    """``Basic.Deliver.unmarshal``: consumer tag, delivery tag, redelivered, exchange, routing key.

    Raises:
        ValueError: ``data`` does not hold them all.
    """
    try:
        self.consumer_tag, pos = _short(data, 0)
        self.delivery_tag, bits = _DELIVERY.unpack_from(data, pos)
        self.redelivered = bool(bits & 1)
        self.exchange, pos = _short(data, pos + _DELIVERY.size)
        self.routing_key, pos = _short(data, pos)
    except (IndexError, struct.error) as err:
        raise ValueError("Could not unpack Basic.Deliver") from err


def install() -> bool:
    """Have pamqp decode ``Basic.Deliver`` and ``Basic.Properties`` with the functions above.

    Only while both still use pamqp's generic ``unmarshal``; returns whether they now use ours.
    """
    global _LAYOUT
    deliver, properties = commands.Basic.Deliver, commands.Basic.Properties
    if (deliver.unmarshal, properties.unmarshal) == (unmarshal_deliver, unmarshal_properties):
        return True
    if (
        deliver.unmarshal is not base.Frame.unmarshal
        or properties.unmarshal is not base.BasicProperties.unmarshal
    ):
        return False
    try:
        fields = [deliver.amqp_type(name) for name in deliver.__slots__]
        layout = tuple((n, properties.flags[n], getattr(properties, f"_{n}")) for n in properties.__slots__)
    except (AttributeError, KeyError, TypeError):
        return False  # another layout of pamqp's classes: keep its decoders
    if fields != ["shortstr", "longlong", "bit", "shortstr", "shortstr"] or any(
        kind not in ("shortstr", "table", "octet", "timestamp") for _, _, kind in layout
    ):
        return False
    _LAYOUT = layout
    deliver.unmarshal = unmarshal_deliver  # type: ignore[method-assign]
    properties.unmarshal = unmarshal_properties  # type: ignore[method-assign]
    return True
