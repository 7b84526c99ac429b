"""GroupResult: the results of a group's tasks, in the group's order (Celery's API, awaited)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from aqueue import states
from aqueue.exceptions import TimeoutError

if TYPE_CHECKING:
    from aqueue.result.asyncresult import AsyncResult
    from aqueue.result.base import ResultBackend

__all__ = ["GroupResult"]

_FAILED = (states.FAILURE, states.REVOKED)


class GroupResult:
    """The results of one group: ``await gr.get()`` is the list of its tasks' results, in order.

    Parameters:
        id: the group's id (each member's message carries it).
        results: one :class:`AsyncResult` per member, in the group's order.
    """

    __slots__ = ("_sent", "backend", "id", "parent", "results")

    def __init__(
        self, id: str, results: list[AsyncResult[Any]], *, backend: ResultBackend | None = None
    ) -> None:
        self.id, self.results, self.backend = id, results, backend
        self.parent: AsyncResult[Any] | GroupResult | None = None
        self._sent: asyncio.Future[None] | None = None

    def __await__(self) -> Generator[Any, None, GroupResult]:
        """Wait until the broker accepted every member's message; a publish failure raises here."""
        sent = self._sent
        if sent is not None:
            if not sent.done():
                yield from asyncio.shield(sent).__await__()
            sent.result()
        return self

    async def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Wait for every member; returns their results in the group's order.

        Parameters:
            timeout: seconds to wait at most for all of them.
            propagate: re-raise the first failed member's exception (in group order).

        Raises:
            TimeoutError: they did not all finish in time.
            Exception: the first failed member's exception, when ``propagate`` is true.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        outcomes = await asyncio.gather(
            *(r.get(timeout=left(), propagate=False) for r in self.results), return_exceptions=True
        )
        failed = None
        for result, outcome in zip(self.results, outcomes, strict=True):
            if result.state in _FAILED:
                failed = failed or outcome
            elif isinstance(outcome, TimeoutError):
                raise TimeoutError(f"The operation timed out waiting for group {self.id}.") from outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # not the task's own failure: a publish error, no backend, ...
        if propagate and isinstance(failed, BaseException):
            raise failed
        return list(outcomes)

    join = get

    async def refresh(self) -> list[str]:
        """Fetch every member's state; returns them in order."""
        return list(await asyncio.gather(*(r.refresh() for r in self.results)))

    async def ready(self) -> bool:
        """Whether every member has finished."""
        return all(state in states.READY_STATES for state in await self.refresh())

    async def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(state == states.SUCCESS for state in await self.refresh())

    async def successful(self) -> bool:
        """Whether every member succeeded."""
        return all(state == states.SUCCESS for state in await self.refresh())

    async def failed(self) -> bool:
        """Whether any member failed."""
        return any(state == states.FAILURE for state in await self.refresh())

    async def waiting(self) -> bool:
        """Whether any member has not finished yet."""
        return not await self.ready()

    async def forget(self) -> None:
        await asyncio.gather(*(r.forget() for r in self.results))

    async def first_failure(self) -> BaseException | None:
        """The exception of the first failed member, in group order (fetches their states)."""
        await self.refresh()
        for result in self.results:
            if result.state in _FAILED:
                failure = result.result
                return failure if isinstance(failure, BaseException) else None
        return None

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult[Any]]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any]:
        return self.results[index]

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return self.id == other.id and self.results == other.results
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)
