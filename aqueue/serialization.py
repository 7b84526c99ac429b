"""Content types: JSON (pydantic_core, the default), msgpack, and pickle only where accepted."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pydantic_core

from aqueue.exceptions import ContentDisallowed, DecodeError, EncodeError, ImproperlyConfigured

__all__ = ["Serializer", "accepted_content_types", "get_serializer", "serializer_for"]


@dataclass(frozen=True, slots=True)
class Serializer:
    """A named content type with its encode and decode functions."""

    name: str
    content_type: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raises EncodeError naming this serializer."""
        try:
            return self.dumps(value)
        except Exception as exc:
            raise EncodeError(f"cannot be serialized with {self.name}: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        """Decode ``data``; raises DecodeError on bytes that are not this content type."""
        try:
            return self.loads(data)
        except Exception as exc:
            raise DecodeError(f"Cannot decode {self.name} content: {exc}") from exc


def _json_loads(data: bytes) -> Any:
    return pydantic_core.from_json(data, cache_strings="keys")


def _msgpack_dumps(value: Any) -> bytes:
    import msgpack

    return msgpack.packb(value, use_bin_type=True, default=_msgpack_default)  # type: ignore[no-any-return]


def _msgpack_default(value: Any) -> Any:
    return pydantic_core.to_jsonable_python(value)


def _msgpack_loads(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data, raw=False, strict_map_key=False)


_SERIALIZERS = {
    s.name: s
    for s in (
        Serializer("json", "application/json", pydantic_core.to_json, _json_loads),
        Serializer("msgpack", "application/x-msgpack", _msgpack_dumps, _msgpack_loads),
        Serializer("pickle", "application/x-python-serialize", pickle.dumps, pickle.loads),
    )
}
_BY_CONTENT_TYPE = {s.content_type: s for s in _SERIALIZERS.values()}


def get_serializer(name: str) -> Serializer:
    """The serializer called ``name`` (``json``, ``msgpack``, ``pickle``) or with that content type."""
    found = _SERIALIZERS.get(name) or _BY_CONTENT_TYPE.get(name)
    if found is None:
        raise ImproperlyConfigured(
            f"Unknown serializer {name!r}: use one of {', '.join(sorted(_SERIALIZERS))}"
        )
    if found.name == "msgpack":
        try:
            import msgpack  # noqa: F401
        except ImportError:
            raise ImproperlyConfigured(
                "The msgpack serializer needs the 'msgpack' package: pip install 'aqueue[msgpack]'"
            ) from None
    return found


def accepted_content_types(accept: Iterable[str]) -> frozenset[str]:
    """The content types named by ``accept_content`` (names or MIME types)."""
    return frozenset(get_serializer(name).content_type for name in accept)


def serializer_for(content_type: str, accepted: frozenset[str]) -> Serializer:
    """The serializer for an incoming ``content_type``, refusing what is not accepted."""
    if content_type not in accepted:
        raise ContentDisallowed(
            f"Refusing content of type {content_type!r}: it is not in accept_content "
            f"({', '.join(sorted(accepted))})"
        )
    found = _BY_CONTENT_TYPE.get(content_type)
    if found is None:
        raise DecodeError(f"Unknown content type {content_type!r}")
    return found
