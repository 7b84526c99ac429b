"""The backend used when no ``result_backend`` is set: stores nothing, and says so when asked."""

from __future__ import annotations

from aqueue.exceptions import NoResultBackend
from aqueue.message import Message
from aqueue.result.base import ResultBackend, TaskMeta

__all__ = ["DisabledBackend"]


class DisabledBackend(ResultBackend):
    """No result backend: storing is a no-op, reading raises :class:`NoResultBackend`."""

    def __init__(self) -> None:
        super().__init__("disabled://")

    async def store(self, meta: TaskMeta, request: Message | None = None) -> None:
        pass

    async def _set(self, task_id: str, data: bytes, meta: TaskMeta) -> None:
        pass

    async def _get(self, task_id: str) -> bytes | None:
        raise NoResultBackend(task_id)

    async def _delete(self, task_id: str) -> None:
        raise NoResultBackend(task_id)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskMeta:
        raise NoResultBackend(task_id)

    def __repr__(self) -> str:
        return "<DisabledBackend: no result_backend set>"
