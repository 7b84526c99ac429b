"""The task message every broker carries, and the envelope brokers move.

A :class:`Message` is what a worker runs. It travels as the body of an :class:`Envelope`, encoded with
the task's serializer; brokers only ever see envelopes (bytes plus a few routing fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aqueue.exceptions import DecodeError, EncodeError
from aqueue.serialization import Serializer, serializer_for

__all__ = ["Envelope", "Message", "decode_message", "encode_message"]


@dataclass(slots=True)
class Message:
    """One task call: what to run, with what, and how."""

    id: str
    task: str
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: float | None = None
    """Unix time before which the task must not start."""
    expires: float | None = None
    """Unix time after which the task is revoked instead of run."""
    ignore_result: bool = False
    reply_to: str | None = None
    headers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
        }
        # Optional fields are left out when empty: smaller messages, faster encode and decode.
        if self.retries:
            data["retries"] = self.retries
        if self.eta is not None:
            data["eta"] = self.eta
        if self.expires is not None:
            data["expires"] = self.expires
        if self.ignore_result:
            data["ignore_result"] = True
        if self.reply_to is not None:
            data["reply_to"] = self.reply_to
        if self.headers:
            data["headers"] = self.headers
        return data


@dataclass(slots=True, frozen=True)
class Envelope:
    """What a broker stores and delivers: an encoded message and where it goes."""

    id: str
    queue: str
    body: bytes
    content_type: str
    eta: float | None = None
    priority: int | None = None


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
    """Decode a message body.

    Raises:
        ContentDisallowed: ``content_type`` is not accepted.
        DecodeError: the body is not a task message.
    """
    data = serializer_for(content_type, accepted).decode(body)
    try:
        task_id, name = data["id"], data["task"]
        args, kwargs = data.get("args", ()), data.get("kwargs") or {}
        if not (isinstance(task_id, str) and isinstance(name, str)):
            raise TypeError("id and task must be strings")
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise TypeError("args must be a list and kwargs a mapping")
        return Message(
            task_id,
            name,
            args,
            kwargs,
            data.get("retries", 0),
            data.get("eta"),
            data.get("expires"),
            data.get("ignore_result", False),
            data.get("reply_to"),
            data.get("headers"),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise DecodeError(f"Not a task message: {exc}") from exc
