"""The task message every broker carries, the envelope brokers move, and the codec between them.

A :class:`Message` is what a worker runs: one task call with the fields of Celery's message protocol
v2 (ids of the workflow it belongs to, callbacks, the rest of its chain, its chord). It travels as an
:class:`Envelope`: bytes plus a few routing fields, and headers for brokers whose wire carries them. A
broker's :class:`Codec` turns one into the other; the native codec puts the whole message in the body,
encoded with the task's serializer, leaving out every field that is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from aqueue.exceptions import DecodeError, EncodeError
from aqueue.serialization import Serializer, serializer_for

__all__ = ["NATIVE", "Codec", "Envelope", "Message", "decode_message", "encode_message", "message_from"]


@dataclass(slots=True)
class Message:
    """One task call: what to run, with what, how, and where it stands in a workflow.

    ``Message(id, task, args, kwargs)``; every other field by keyword.
    """

    id: str
    task: str
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    retries: int = 0
    eta: float | None = None
    """Unix time before which the task must not start."""
    expires: float | None = None
    """Unix time after which the task is revoked instead of run."""
    ignore_result: bool = False
    reply_to: str | None = None
    headers: dict[str, Any] | None = None
    """Custom headers given at the call (``apply_async(headers=...)``)."""
    priority: int | None = None
    time_limit: float | None = None
    """Set at the call: overrides the task's own (Celery's ``timelimit`` header, first item)."""
    soft_time_limit: float | None = None
    root_id: str | None = None
    """The first task of the workflow this one belongs to; ``None`` means this task is the root."""
    parent_id: str | None = None
    """The task whose worker sent this one (a chain's previous step, the task that called delay())."""
    group: str | None = None
    """The id of the group (or chord header) this task is a member of."""
    group_index: int | None = None
    """This task's place in its group: where its result goes in the group's list."""
    callbacks: list[dict[str, Any]] | None = None
    """Signatures to send with the result when the task succeeds (``link``)."""
    errbacks: list[dict[str, Any]] | None = None
    """Signatures to call when the task fails (``link_error``)."""
    chain: list[dict[str, Any]] | None = None
    """The rest of the chain after this task, last step first (Celery's order)."""
    chord: dict[str, Any] | None = None
    """The chord callback this task is a header of; it holds ``chord_size``."""

    @property
    def root(self) -> str:
        """The workflow's root task id (this task's own when it is the root)."""
        return self.root_id or self.id

    def to_dict(self) -> dict[str, Any]:
        """The message as plain data, under Celery's names, without the fields that are empty."""
        data: dict[str, Any] = {"id": self.id, "task": self.task, "args": self.args, "kwargs": self.kwargs}
        # Optional fields are left out when empty: smaller messages, faster encode and decode.
        if self.retries:
            data["retries"] = self.retries
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None and value is not False:
                data[name] = value
        if self.time_limit is not None or self.soft_time_limit is not None:
            data["timelimit"] = [self.time_limit, self.soft_time_limit]
        if self.root_id is not None and self.root_id != self.id:
            data["root_id"] = self.root_id
        return data


_OPTIONAL = (
    "eta", "expires", "ignore_result", "reply_to", "headers", "priority", "parent_id", "group",
    "group_index", "callbacks", "errbacks", "chain", "chord",
)  # fmt: skip


@dataclass(slots=True, frozen=True)
class Envelope:
    """What a broker stores and delivers: an encoded message and where it goes."""

    id: str
    queue: str
    body: bytes
    content_type: str
    eta: float | None = None
    priority: int | None = None
    headers: dict[str, Any] | None = None
    """Headers carried beside the body, for a codec whose wire has them; ``None`` for the native one."""
    _: KW_ONLY
    resent: bool = False
    """Published again by a retry that cannot know whether the failed attempt stored it. Redis and
    RabbitMQ deliver it as a redelivery, so a worker runs it only if the task is neither running nor
    finished (a failed publish on SQLite or memory:// stored nothing)."""
    reply_to: str | None = None
    """Where replies go (``rpc://``), for a wire that carries it beside the body."""


class Codec:
    """How messages are laid out on a broker's wire. This one, the native codec, uses the body alone."""

    name = "aqueue"

    def encode(self, message: Message, serializer: Serializer) -> tuple[bytes, dict[str, Any] | None]:
        """The body, and the headers to carry beside it.

        Raises:
            EncodeError: naming the task, the argument and the serializer.
        """
        return encode_message(message, serializer), None

    def decode(
        self,
        body: bytes,
        content_type: str,
        headers: Mapping[str, Any] | None,
        accepted: frozenset[str],
        properties: Mapping[str, Any] | None = None,
    ) -> Message:
        """The message in a delivery; ``properties`` are the wire's (``reply_to``, ``priority``), if any.

        Raises:
            ContentDisallowed: ``content_type`` is not accepted.
            DecodeError: the body (or a header) is not a task message; the message says which field.
        """
        return decode_message(body, content_type, accepted)


NATIVE = Codec()
"""The codec of every broker that does not name another."""


def encode_message(message: Message, serializer: Serializer) -> bytes:
    """Encode ``message``; on failure name the argument that cannot be encoded.

    Raises:
        EncodeError: naming the task, the argument and the serializer.
    """
    try:
        return serializer.dumps(message.to_dict())
    except Exception as exc:
        raise EncodeError(_which_argument(message, serializer, exc)) from exc


def _which_argument(message: Message, serializer: Serializer, exc: Exception) -> str:
    named: list[tuple[str, Any]] = [(f"positional argument {i}", v) for i, v in enumerate(message.args)]
    named += [(f"keyword argument {k!r}", v) for k, v in message.kwargs.items()]
    for label, value in named:
        try:
            serializer.dumps(value)
        except Exception as inner:
            return (
                f"Cannot send {message.task}: {label} ({type(value).__name__}) cannot be serialized "
                f"with {serializer.name}: {inner}. Pass plain data (str, int, float, list, dict, ...) "
                f"or choose another serializer."
            )
    return f"Cannot send {message.task}: the message cannot be serialized with {serializer.name}: {exc}"


def decode_message(body: bytes, content_type: str, accepted: frozenset[str]) -> Message:
    """Decode a native message body, checking the type of every field a worker reads.

    Raises:
        ContentDisallowed: ``content_type`` is not accepted.
        DecodeError: the body is not a task message; the message names the bad field.
    """
    data = serializer_for(content_type, accepted).decode(body)
    if not isinstance(data, dict):
        raise DecodeError(f"Not a task message: a {type(data).__name__}, not a mapping")
    return message_from(data)


def message_from(data: Mapping[str, Any]) -> Message:
    """A :class:`Message` from plain data under Celery's names (unknown names are ignored).

    Raises:
        DecodeError: a field is missing or of the wrong type; the message names it.
    """
    task_id, name = data.get("id"), data.get("task")
    args, kwargs = data.get("args", ()), data.get("kwargs") or {}
    if not isinstance(task_id, str) or not task_id:
        raise DecodeError(f"Not a task message: 'id' must be a non-empty string, not {task_id!r}")
    if not isinstance(name, str) or not name:
        raise DecodeError(f"Not a task message: 'task' must be a non-empty string, not {name!r}")
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise DecodeError(f"Not a task message ({task_id}): args must be a list and kwargs a mapping")
    message = Message(id=task_id, task=name, args=args, kwargs=kwargs)
    for key, value in data.items():
        check = _FIELDS.get(key)
        if check is not None and value is not None:
            attribute, valid = check
            if not valid(value):
                raise DecodeError(f"Not a task message ({task_id}): bad {key!r} field {value!r:.100}")
            if attribute == "timelimit":
                message.time_limit, message.soft_time_limit = value
            else:
                setattr(message, attribute, value)
    return message


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _limits(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(v is None or _number(v) for v in value)


def _signatures(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "retries": ("retries", _count),
    "eta": ("eta", _number),
    "expires": ("expires", _number),
    "ignore_result": ("ignore_result", lambda v: isinstance(v, bool)),
    "reply_to": ("reply_to", _text),
    "headers": ("headers", lambda v: isinstance(v, dict)),
    "priority": ("priority", lambda v: _count(v) and v <= 255),
    "timelimit": ("timelimit", _limits),
    "root_id": ("root_id", _text),
    "parent_id": ("parent_id", _text),
    "group": ("group", _text),
    "group_index": ("group_index", _count),
    "callbacks": ("callbacks", _signatures),
    "errbacks": ("errbacks", _signatures),
    "chain": ("chain", _signatures),
    "chord": ("chord", lambda v: isinstance(v, dict)),
}
"""Each optional field: the attribute it sets and the check its value must pass."""
