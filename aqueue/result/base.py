"""The result backend seam: where task states and results are kept.

The base class implements the public behaviour once (encoding, PENDING for unknown ids, waiting with
a deadline); a backend fills in ``_set``, ``_get`` and ``_delete``, and may override ``wait`` to be
woken instead of polling.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio

from aqueue import states
from aqueue._compat import AsyncResource
from aqueue.exceptions import DecodeError, TaskRevokedError, TimeoutError
from aqueue.message import Message
from aqueue.result.failure import exception_to_result
from aqueue.serialization import Serializer, get_serializer

__all__ = ["ChordJoin", "ResultBackend", "TaskMeta"]


@dataclass(slots=True)
class TaskMeta:
    """A task's state as stored: for FAILURE, ``result`` holds exc_type, exc_module and exc_message.

    It is stored in Celery's layout (``to_dict``), so that Celery clients and workers read and write the
    same states: ``status``, ``result``, ``traceback``, ``children``, ``date_done``, ``group_id`` and
    ``parent_id`` when the task has them, and ``task_id``. A REVOKED state's result is Celery's
    ``TaskRevokedError`` with the reason. ``name`` is kept in memory only (Celery stores it only with
    ``result_extended``).
    """

    task_id: str
    status: str = states.PENDING
    result: Any = None
    traceback: str | None = None
    date_done: str | None = None
    name: str | None = None
    children: list[Any] | None = None
    group_id: str | None = None
    parent_id: str | None = None

    @property
    def ready(self) -> bool:
        return self.status in states.READY_STATES

    def complete(self, request: Message | None) -> None:
        """Fill in what storing adds: the time a ready state was reached, the request's group and parent."""
        if self.date_done is None and self.ready:
            self.date_done = now_iso()
        if request is not None:
            self.group_id = self.group_id or request.group
            self.parent_id = self.parent_id or request.parent_id

    def to_dict(self) -> dict[str, Any]:
        """The state in Celery's layout (see the class docstring)."""
        result = self.result
        if self.status == states.REVOKED and not isinstance(result, dict):
            result = exception_to_result(TaskRevokedError(result))
        data = {
            "status": self.status,
            "result": result,
            "traceback": self.traceback,
            "children": self.children or [],
            "date_done": self.date_done,
        }
        if self.group_id:
            data["group_id"] = self.group_id
        if self.parent_id:
            data["parent_id"] = self.parent_id
        data["task_id"] = self.task_id
        return data

    @classmethod
    def from_dict(cls, data: Any) -> TaskMeta:
        """A state stored in Celery's layout (by aqueue or by Celery).

        Raises:
            DecodeError: ``data`` is not a stored state.
        """
        try:
            return cls(
                data["task_id"],
                data["status"],
                data.get("result"),
                data.get("traceback"),
                data.get("date_done"),
                data.get("name"),
                data.get("children"),
                data.get("group_id"),
                data.get("parent_id"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise DecodeError(f"Not a stored task result: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class ChordJoin:
    """What a chord's header task learns when it reports its final state (:meth:`ResultBackend.chord_join`)."""

    parts: list[TaskMeta] | None
    """Every header task's state, in header order, once all have reported; else ``None``."""
    first: bool
    """This report completed the chord: its task sends the callback."""
    sent: bool
    """The callback was sent already (:meth:`ResultBackend.chord_sent`)."""
    completed_by: int | None = None
    """The index of the part whose report completed the chord: only a copy of that part, coming again
    after its worker died, may send the callback in its stead."""


CHORD_TTL = 86400.0
"""Seconds a chord's join is kept when results do not expire."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class ResultBackend(AsyncResource, ABC):
    """Stores task states. Use it as ``async with backend:`` or call ``connect()``/``aclose()``."""

    url: str
    poll_interval: float = 0.5
    """The longest pause between two reads while ``wait`` polls."""

    def __init__(self, url: str, serializer: str = "json", expires: float | None = None) -> None:
        self.url, self.expires = url, expires
        self.serializer: Serializer = get_serializer(serializer)

    def prepare(self, message: Message) -> None:
        """Called for each message this process publishes, before it is encoded."""

    async def store(self, meta: TaskMeta, request: Message | None = None) -> None:
        """Record ``meta``; ``request`` is the message being run, when there is one."""
        meta.complete(request)
        await self._set(meta.task_id, self.serializer.dumps(meta.to_dict()), meta)

    async def get(self, task_id: str) -> TaskMeta:
        """The stored state of ``task_id``; PENDING when nothing is stored."""
        data = await self._get(task_id)
        if data is None:
            return TaskMeta(task_id)
        return TaskMeta.from_dict(self.serializer.decode(data))

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskMeta:
        """Wait until ``task_id`` is ready and return its state.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            meta = await self.get(task_id)
            if meta.ready:
                return meta
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"The operation timed out waiting for task {task_id}.")
                pause = min(pause, left)
            await anyio.sleep(pause)
            pause = min(pause * 2, self.poll_interval)

    async def forget(self, task_id: str) -> None:
        """Remove what is stored for ``task_id``."""
        await self._delete(task_id)

    @property
    def supports_chords(self) -> bool:
        """Whether this backend keeps chord joins (it implements ``_chord_join``)."""
        return type(self)._chord_join is not ResultBackend._chord_join

    async def chord_join(self, group_id: str, index: int, size: int, meta: TaskMeta) -> ChordJoin:
        """Record the final state of the header task at ``index`` of the ``size`` of chord ``group_id``.

        A part reported twice counts once. The report that makes the count complete is told it is
        ``first``, and only that one; every report after completion gets the parts too, and the index
        of the part that completed it.
        """
        if meta.date_done is None:
            meta.date_done = now_iso()
        ttl = self.expires if self.expires and self.expires > 0 else CHORD_TTL
        first, sent, by, parts = await self._chord_join(
            group_id, index, size, self.serializer.dumps(meta.to_dict()), ttl
        )
        decoded = None if parts is None else [TaskMeta.from_dict(self.serializer.decode(p)) for p in parts]
        return ChordJoin(decoded, first, sent, by)

    async def chord_sent(self, group_id: str) -> None:
        """Record that chord ``group_id``'s callback was sent (or failed in its stead)."""
        await self._chord_sent(group_id)

    async def _chord_join(
        self, group_id: str, index: int, size: int, data: bytes, ttl: float
    ) -> tuple[bool, bool, int | None, list[bytes] | None]:
        """Atomically: keep ``data`` as part ``index`` unless it is there; once ``size`` parts are there,
        return (whether this call completed them, whether sent, the index of the part whose call
        completed them, the parts in order); else (False, False, None, None)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no chord joins")

    async def _chord_sent(self, group_id: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} keeps no chord joins")

    @abstractmethod
    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None: ...

    @abstractmethod
    async def _get(self, task_id: str) -> bytes | None: ...

    @abstractmethod
    async def _delete(self, task_id: str) -> None: ...

    def __repr__(self) -> str:
        from aqueue.urls import mask_password

        return f"<{type(self).__name__} {mask_password(self.url)}>"

    __str__ = __repr__
