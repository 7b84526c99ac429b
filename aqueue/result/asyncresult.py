"""AsyncResult: Celery's result handle. Properties hold the last state fetched; awaited methods fetch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from aqueue import states
from aqueue.exceptions import ResultNotStored, TaskRevokedError
from aqueue.result.failure import exception_from_result

if TYPE_CHECKING:
    from aqueue.result.base import ResultBackend, TaskMeta
    from aqueue.result.groupresult import GroupResult

__all__ = ["AsyncResult"]

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """The result of a task call.

    ``await result`` waits until the broker has accepted the message (a publish failure raises there)
    and returns the result itself. ``get()`` waits for the task's result and, at the same time, for
    the broker's acceptance: a publish failure raises, and a result that arrives before the broker's
    confirm is returned at once.
    """

    __slots__ = ("_convert", "_meta", "_sent", "backend", "id", "ignored", "parent", "task_name")

    def __init__(
        self,
        id: str,
        backend: ResultBackend,
        *,
        sent: asyncio.Future[None] | None = None,
        ignored: bool = False,
        task_name: str | None = None,
        convert: Callable[[Any], R] | None = None,
    ) -> None:
        self.id, self.backend, self.task_name = id, backend, task_name
        self._convert = convert
        self.ignored = ignored
        self._sent = sent
        self._meta: TaskMeta | None = None
        self.parent: AsyncResult[Any] | GroupResult | None = None
        """The result this one follows in a workflow: a chain's step before, a chord's header."""

    def __await__(self) -> Generator[Any, None, AsyncResult[R]]:
        sent = self._sent
        if sent is not None:
            if not sent.done():
                yield from asyncio.shield(sent).__await__()
            sent.result()  # a publish failure raises here
        return self

    @overload
    async def get(self, timeout: float | None = None, propagate: Literal[True] = True) -> R: ...
    @overload
    async def get(self, timeout: float | None = None, propagate: bool = True) -> R | BaseException: ...

    async def get(self, timeout: float | None = None, propagate: bool = True) -> R | BaseException:
        """Wait for the task to finish and return its return value.

        Parameters:
            timeout: seconds to wait at most; ``None`` waits for ever.
            propagate: re-raise the task's exception (else return the exception instance).

        Raises:
            TimeoutError: the task did not finish in time (aqueue.exceptions.TimeoutError).
            NoResultBackend: the app has no result backend.
            ResultNotStored: the task was sent with ignore_result.
            Exception: the task's own exception, when it failed and ``propagate`` is true.
        """
        if self.ignored:
            raise ResultNotStored(self.id)
        sent = self._sent
        if sent is None or sent.done():
            await self
            self._meta = await self.backend.wait(self.id, timeout)
        else:
            self._meta = await self._wait_while_sending(sent, timeout)
        if self._meta.status == states.SUCCESS:
            return self._value(self._meta.result)
        exc = self._exception() if self.parent is None else await self._first_failure()
        if propagate:
            raise exc
        return exc

    async def _first_failure(self) -> BaseException:
        """The exception of the earliest failed result this one follows (as Celery's ``get()``), else its own.

        A chain's last result re-raises the failed step's exception; a chord's, its failed header task's.
        """
        from aqueue.result.groupresult import GroupResult

        parents: list[AsyncResult[Any] | GroupResult] = []
        node = self.parent
        while node is not None:
            parents.append(node)
            node = node.parent
        for parent in reversed(parents):
            if isinstance(parent, GroupResult):
                failure = await parent.first_failure()
                if failure is not None:
                    return failure
            elif await parent.refresh() in (states.FAILURE, states.REVOKED):
                own: BaseException = parent._exception()
                return own
        return self._exception()

    async def _wait_while_sending(self, sent: asyncio.Future[None], timeout: float | None) -> TaskMeta:
        """Wait for the result while the broker's confirm of the message is still on its way.

        A result that arrives first proves the message was accepted, so it does not wait for the confirm
        as well; a publish failure that arrives first raises.
        """
        waiting = asyncio.ensure_future(self.backend.wait(self.id, timeout))
        try:
            await asyncio.wait((sent, waiting), return_when=asyncio.FIRST_COMPLETED)
            if sent.done():
                sent.result()  # a publish failure raises here
            return await waiting
        finally:
            if not waiting.done():
                waiting.cancel()
            elif not waiting.cancelled():
                waiting.exception()  # read, so a failure that lost the race is not logged as unretrieved

    async def refresh(self) -> str:
        """Fetch the task's state from the backend; returns it."""
        self._meta = await self.backend.get(self.id)
        return self._meta.status

    async def ready(self) -> bool:
        """Whether the task has finished (succeeded, failed or was revoked)."""
        return await self.refresh() in states.READY_STATES

    async def successful(self) -> bool:
        return await self.refresh() == states.SUCCESS

    async def failed(self) -> bool:
        return await self.refresh() == states.FAILURE

    async def forget(self) -> None:
        """Remove the stored result."""
        await self.backend.forget(self.id)
        self._meta = None

    @property
    def state(self) -> str:
        """The last state fetched (no I/O); PENDING before any fetch."""
        return self._meta.status if self._meta is not None else states.PENDING

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception instance for a failed task, from the last fetch."""
        meta = self._meta
        if meta is None:
            return None
        if meta.status in (states.FAILURE, states.REVOKED, states.RETRY):
            return self._exception()
        return self._value(meta.result) if meta.status == states.SUCCESS else meta.result

    info = result

    @property
    def traceback(self) -> str | None:
        """The worker-side traceback of a failed task, from the last fetch."""
        return self._meta.traceback if self._meta is not None else None

    @property
    def date_done(self) -> datetime | None:
        meta = self._meta
        return datetime.fromisoformat(meta.date_done) if meta and meta.date_done else None

    def _value(self, stored: Any) -> R:
        return self._convert(stored) if self._convert is not None else stored

    def _exception(self) -> BaseException:
        assert self._meta is not None
        stored = self._meta.result
        if self._meta.status == states.REVOKED:
            why = exception_from_result(stored) if isinstance(stored, dict) else stored
            return TaskRevokedError(f"Task {self.id} was revoked: {why}")
        return exception_from_result(stored)

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return self.id == other.id
        return other == self.id if isinstance(other, str) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)
