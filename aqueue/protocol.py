"""Celery's task message protocol v2: a :class:`~aqueue.message.Message` as headers, properties and a body.

This is the layout Celery 5 clients and workers send and read, so that aqueue and Celery workers can
share queues. A message travels as:

- headers: ``lang``, ``task``, ``id``, ``shadow``, ``eta`` and ``expires`` (ISO 8601), ``group``,
  ``group_index``, ``retries``, ``timelimit`` (``[hard, soft]``), ``root_id``, ``parent_id``,
  ``argsrepr``, ``kwargsrepr``, ``origin``, ``ignore_result``, ``replaced_task_nesting``,
  ``stamped_headers``, ``stamps``, and the custom headers given at the call
  (``apply_async(headers=...)``, merged in as Celery merges them);
- properties (the transport's, read by :meth:`CeleryCodec.decode` from its ``properties`` mapping):
  ``correlation_id`` (the task id), ``reply_to`` (where ``rpc://`` results go), ``priority``;
- body, in the task's serializer: ``[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]``, the
  workflow fields as Celery lays them out (signature dicts; ``chain`` is the rest of the chain, last
  step first).

The codec is the broker's choice (``Broker.codec``) and knows no wire: it returns the headers as a
mapping, which the AMQP broker puts in its headers table and a layout without one could put in an
envelope. The headers every message of a task shares (``lang``, ``task``, ``origin``, ...) are built once
per task name as a :class:`HeaderBlock`, which a wire may also encode once (the AMQP wire does).
``argsrepr`` and ``kwargsrepr`` are ``repr()`` of the arguments, bounded: at most 1,024 characters, and
nested containers, long strings and big collections cut short as :mod:`reprlib` does.

Decoding checks every field a worker uses and raises :class:`~aqueue.exceptions.DecodeError` naming
the field. A delivery without a ``task`` header is read as aqueue's native layout (the whole message in
the body), so messages queued by an earlier aqueue still run.
"""

from __future__ import annotations

import math
import os
import reprlib
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, NoReturn

from aqueue.exceptions import DecodeError, EncodeError
from aqueue.message import Codec, Message, _which_argument, decode_message
from aqueue.serialization import Serializer, serializer_for

__all__ = ["BROKER_HEADERS", "CELERY", "CeleryCodec", "HeaderBlock", "TaskHeaders", "bounded_repr"]

REPR_LIMIT = 1024
"""The longest ``argsrepr`` / ``kwargsrepr``, as Celery's (``argsrepr_maxsize``)."""

_KNOWN = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit",
        "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
        "replaced_task_nesting", "stamped_headers", "stamps", "meth",
    }
)  # fmt: skip
"""Celery's own headers; any other is a custom header of the call (``Message.headers``)."""

BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
"""Prefixes of the headers RabbitMQ adds on the way (dead-lettering, redelivery counts): not the caller's."""


class HeaderBlock:
    """The headers every message of one task shares, built once per task name.

    ``encoded`` is free for a wire to keep its own encoding of ``items`` in (the AMQP wire keeps its
    table encoding there), so that it too is done once per task.
    """

    __slots__ = ("encoded", "items")

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items
        self.encoded: bytes | None = None


class TaskHeaders(dict[str, Any]):
    """A task message's headers: its task's :class:`HeaderBlock` first, then the message's own fields.

    A plain dict to whoever reads it; a wire that has encoded ``block`` may encode only the entries
    after the first ``len(block.items)``.
    """

    __slots__ = ("block",)

    def __init__(self, block: HeaderBlock) -> None:
        super().__init__(block.items)
        self.block = block


class CeleryCodec(Codec):
    """Celery's message protocol v2 (see the module docstring).

    Parameters:
        zone: the time zone of a naive ``eta`` or ``expires`` (Celery 5 always sends them with one).
    """

    name = "celery"

    def __init__(self, zone: tzinfo = UTC) -> None:
        self.zone = zone
        self._blocks: dict[str, HeaderBlock] = {}
        self._origin = _origin()
        os.register_at_fork(after_in_child=self._forked)

    def encode(self, message: Message, serializer: Serializer) -> tuple[bytes, dict[str, Any] | None]:
        embed = {
            "callbacks": message.callbacks,
            "errbacks": message.errbacks,
            "chain": message.chain,
            "chord": message.chord,
        }
        try:
            body = serializer.dumps([message.args, message.kwargs, embed])
        except Exception as exc:
            raise EncodeError(_which_argument(message, serializer, exc)) from exc
        return body, self.headers(message)

    def headers(self, message: Message) -> dict[str, Any]:
        """The headers of ``message``, as Celery's ``as_task_v2`` lays them out."""
        block = self._blocks.get(message.task) or self._block(message.task)
        headers = TaskHeaders(block)
        eta, expires = message.eta, message.expires
        headers.update(
            id=message.id,
            eta=None if eta is None else _iso(eta),
            expires=None if expires is None else _iso(expires),
            group=message.group,
            group_index=message.group_index,
            retries=message.retries,
            timelimit=[message.time_limit, message.soft_time_limit],
            root_id=message.root_id or message.id,
            parent_id=message.parent_id,
            argsrepr=bounded_repr(message.args),
            kwargsrepr=bounded_repr(message.kwargs),
            ignore_result=message.ignore_result,
        )
        custom = message.headers
        if custom:
            if not custom.keys() & block.items.keys():
                headers.update(custom)
                return headers
            return {**headers, **custom}  # a custom header replaces a shared one: no block to reuse
        return headers

    def _block(self, name: str) -> HeaderBlock:
        block = self._blocks[name] = HeaderBlock(
            {
                "lang": "py",
                "task": name,
                "shadow": None,
                "origin": self._origin,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            }
        )
        return block

    def _forked(self) -> None:
        self._blocks, self._origin = {}, _origin()

    def decode(
        self,
        body: bytes,
        content_type: str,
        headers: Mapping[str, Any] | None,
        accepted: frozenset[str],
        properties: Mapping[str, Any] | None = None,
    ) -> Message:
        if not headers or "task" not in headers:
            return decode_message(body, content_type, accepted)
        task_id = headers.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise DecodeError(
                f"Not a Celery task message: header 'id' must be a non-empty string, not {task_id!r:.100}"
            )
        if headers.get("compression"):
            raise DecodeError(
                f"Not a Celery task message aqueue can read ({task_id}): its body is compressed "
                f"({headers['compression']!r}); send it without task_compression"
            )
        data = serializer_for(content_type, accepted).decode(body)
        if not (isinstance(data, list | tuple) and len(data) == 3):
            raise DecodeError(
                f"Not a Celery task message ({task_id}): the body must be [args, kwargs, embed], "
                f"not {data!r:.100}"
            )
        args, kwargs, embed = data
        if not isinstance(args, list | tuple):
            raise DecodeError(
                f"Not a Celery task message ({task_id}): args must be a list, not {args!r:.100}"
            )
        if not isinstance(kwargs, dict):
            raise DecodeError(
                f"Not a Celery task message ({task_id}): kwargs must be a mapping, not {kwargs!r:.100}"
            )
        message = _Reader(task_id, headers, self.zone).message(args, kwargs)
        if embed is not None:
            _embed(message, embed)
        if properties:
            _properties(message, properties)
        return message


class _Reader:
    """Reads and checks the headers of one message; errors name the message and the header."""

    __slots__ = ("headers", "task_id", "zone")

    def __init__(self, task_id: str, headers: Mapping[str, Any], zone: tzinfo) -> None:
        self.task_id, self.headers, self.zone = task_id, headers, zone

    def message(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Message:
        get = self.headers.get
        name = get("task")
        if not isinstance(name, str) or not name:
            self.bad("task", name, "a non-empty string")
        message = Message(self.task_id, name, args, kwargs)
        retries = get("retries")
        if retries:
            message.retries = self.check("retries", retries, _count, "a count")
        eta, expires = get("eta"), get("expires")
        if eta is not None:
            message.eta = self.time("eta", eta)
        if expires is not None:
            message.expires = self.time("expires", expires)
        limits = get("timelimit")
        if limits is not None and limits != [None, None]:
            hard, soft = self.check(
                "timelimit", limits, _limits, "[hard, soft] in seconds (each may be null)"
            )
            message.time_limit, message.soft_time_limit = hard, soft
        for header, attribute in (("root_id", "root_id"), ("parent_id", "parent_id"), ("group", "group")):
            value = get(header)
            if value is not None:
                setattr(message, attribute, self.check(header, value, _text, "a string"))
        index = get("group_index")
        if index is not None:
            message.group_index = self.check("group_index", index, _count, "a count")
        ignore = get("ignore_result")
        if ignore:
            message.ignore_result = self.check("ignore_result", ignore, _flag, "true or false")
        custom = self.headers.keys() - _KNOWN
        if custom:
            own = {k: self.headers[k] for k in custom if not k.startswith(BROKER_HEADERS)}
            message.headers = own or None
        return message

    def time(self, header: str, value: Any) -> float:
        when: datetime | None = value if isinstance(value, datetime) else None
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                pass
        if when is None:
            self.bad(header, value, "an ISO 8601 date and time")
        if when.tzinfo is None:
            when = when.replace(tzinfo=self.zone)
        return when.timestamp()

    def check(self, header: str, value: Any, valid: Callable[[Any], bool], what: str) -> Any:
        if not valid(value):
            self.bad(header, value, what)
        return value

    def bad(self, header: str, value: Any, what: str) -> NoReturn:
        raise DecodeError(
            f"Not a Celery task message ({self.task_id}): header {header!r} must be {what}, not {value!r:.100}"
        )


def _embed(message: Message, embed: Any) -> None:
    if not isinstance(embed, dict):
        raise DecodeError(
            f"Not a Celery task message ({message.id}): the body's third item must be a mapping of "
            f"callbacks, errbacks, chain and chord, not {embed!r:.100}"
        )
    for field in ("callbacks", "errbacks", "chain"):
        value = embed.get(field)
        if value is not None:
            if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise DecodeError(
                    f"Not a Celery task message ({message.id}): {field!r} must be a list of signatures, "
                    f"not {value!r:.100}"
                )
            setattr(message, field, value)
    chord = embed.get("chord")
    if chord is not None:
        if not isinstance(chord, dict):
            raise DecodeError(
                f"Not a Celery task message ({message.id}): 'chord' must be a signature, not {chord!r:.100}"
            )
        message.chord = chord


def _properties(message: Message, properties: Mapping[str, Any]) -> None:
    reply_to, priority = properties.get("reply_to"), properties.get("priority")
    if reply_to:
        if not isinstance(reply_to, str):
            raise DecodeError(f"Not a Celery task message ({message.id}): bad reply_to {reply_to!r:.100}")
        message.reply_to = reply_to
    if priority is not None:
        if not (_count(priority) and priority <= 255):
            raise DecodeError(f"Not a Celery task message ({message.id}): bad priority {priority!r:.100}")
        message.priority = priority


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _origin() -> str:
    """Celery's ``anon_nodename()``: the sender's process and host, ``gen<pid>@<host>``."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _limit(value: Any) -> bool:
    return value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )


def _limits(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and _limit(value[0]) and _limit(value[1])


_FLAT = frozenset({int, float, bool, type(None)})
_SHORT = 80
_reprs = reprlib.Repr()
_reprs.maxlevel, _reprs.maxstring, _reprs.maxother, _reprs.maxlong = 4, 200, 200, 100
_reprs.maxtuple = _reprs.maxlist = _reprs.maxdict = _reprs.maxset = _reprs.maxfrozenset = 32


def bounded_repr(value: Sequence[Any] | Mapping[str, Any]) -> str:
    """``repr(value)`` of task arguments, at most :data:`REPR_LIMIT` characters, at a bounded cost.

    A few plain values (numbers, short strings) are ``repr()`` at once; anything else goes through
    :mod:`reprlib`, which cuts nested containers, long strings and big collections short.
    """
    if not value:
        return repr(value)
    items = value.values() if isinstance(value, Mapping) else value
    if len(value) <= 8 and all(type(v) in _FLAT or (type(v) is str and len(v) <= _SHORT) for v in items):
        text = repr(value)
    else:
        text = _reprs.repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


CELERY = CeleryCodec()
"""The codec of brokers that speak Celery's protocol (RabbitMQ)."""
