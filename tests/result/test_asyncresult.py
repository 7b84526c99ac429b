"""AsyncResult: properties hold the last state fetched (no I/O); awaited methods fetch."""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import assert_type

import anyio
import pytest

from aqueue import AsyncResult, states
from aqueue.exceptions import OperationalError, ResultNotStored, TaskError, TaskRevokedError, TimeoutError
from aqueue.result.base import TaskMeta
from aqueue.result.failure import exception_to_result
from aqueue.result.memory import MemoryBackend


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    async with MemoryBackend(f"memory://{uuid.uuid4().hex}") as backend:
        yield backend


def new_id() -> str:
    return uuid.uuid4().hex


async def test_before_any_fetch_the_properties_are_empty(backend: MemoryBackend) -> None:
    # Given a result whose task succeeded in the backend
    tid = new_id()
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    result: AsyncResult[int] = AsyncResult(tid, backend)
    # Then nothing was fetched, so the properties are Celery's PENDING defaults
    assert (result.state, result.status, result.result, result.info) == (
        states.PENDING,
        states.PENDING,
        None,
        None,
    )
    assert (result.traceback, result.date_done) == (None, None)


async def test_get_returns_the_value_and_fills_the_properties(backend: MemoryBackend) -> None:
    tid = new_id()
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    result: AsyncResult[int] = AsyncResult(tid, backend)
    value = await result.get(timeout=1)
    assert_type(value, int)
    assert value == 8
    assert (result.state, result.result, result.traceback) == (states.SUCCESS, 8, None)
    assert isinstance(result.date_done, datetime) and result.date_done.tzinfo is not None


async def test_get_waits_for_the_task(backend: MemoryBackend) -> None:
    tid = new_id()
    result: AsyncResult[str] = AsyncResult(tid, backend)

    async def finish() -> None:
        await anyio.sleep(0.05)
        await backend.store(TaskMeta(tid, states.SUCCESS, "late"))

    async with anyio.create_task_group() as group:
        group.start_soon(finish)
        assert await result.get(timeout=2) == "late"


async def test_get_times_out_with_aqueues_timeout_error(backend: MemoryBackend) -> None:
    result: AsyncResult[int] = AsyncResult(new_id(), backend)
    with pytest.raises(TimeoutError) as raised:
        await result.get(timeout=0.05)
    assert isinstance(raised.value, builtins.TimeoutError)


async def test_failure_reraises_or_returns_with_propagate_false(backend: MemoryBackend) -> None:
    # Given a failed task
    tid = new_id()
    failure = exception_to_result(ZeroDivisionError("division by zero"))
    await backend.store(TaskMeta(tid, states.FAILURE, failure, "Traceback ...\nZeroDivisionError"))
    result: AsyncResult[float] = AsyncResult(tid, backend)
    # Then get() raises the original class
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        await result.get(timeout=1)
    # And with propagate=False returns it, typed as the value or an exception
    returned = await result.get(timeout=1, propagate=False)
    assert_type(returned, float | BaseException)
    assert isinstance(returned, ZeroDivisionError)
    assert isinstance(result.result, ZeroDivisionError)
    assert result.traceback == "Traceback ...\nZeroDivisionError"
    assert await result.failed() and not await result.successful() and await result.ready()


async def test_a_revoked_task_raises_task_revoked_error(backend: MemoryBackend) -> None:
    tid = new_id()
    await backend.store(TaskMeta(tid, states.REVOKED, "expired"))
    result: AsyncResult[int] = AsyncResult(tid, backend)
    with pytest.raises(TaskRevokedError, match="expired"):
        await result.get(timeout=1)
    assert result.state == states.REVOKED
    assert isinstance(result.result, TaskRevokedError)


async def test_retry_state_is_not_ready_and_shows_the_cause(backend: MemoryBackend) -> None:
    tid = new_id()
    await backend.store(TaskMeta(tid, states.RETRY, exception_to_result(ConnectionError("flaky"))))
    result: AsyncResult[int] = AsyncResult(tid, backend)
    assert not await result.ready()
    assert result.state == states.RETRY
    assert isinstance(result.result, ConnectionError)


async def test_refresh_and_forget(backend: MemoryBackend) -> None:
    tid = new_id()
    result: AsyncResult[int] = AsyncResult(tid, backend)
    assert await result.refresh() == states.PENDING
    await backend.store(TaskMeta(tid, states.STARTED, {"pid": 1}))
    assert await result.refresh() == states.STARTED
    assert not await result.ready()
    await backend.store(TaskMeta(tid, states.SUCCESS, 1))
    assert await result.ready()
    # When forgotten, then the handle and the backend both read PENDING
    await result.forget()
    assert result.state == states.PENDING
    assert await result.refresh() == states.PENDING


async def test_ignored_result_says_why_without_waiting(backend: MemoryBackend) -> None:
    result: AsyncResult[int] = AsyncResult(new_id(), backend, ignored=True)
    with anyio.fail_after(0.5), pytest.raises(ResultNotStored, match="ignore_result"):
        await result.get()


async def test_await_confirms_the_send_and_a_send_failure_raises(backend: MemoryBackend) -> None:
    loop = asyncio.get_running_loop()
    sent: asyncio.Future[None] = loop.create_future()
    result: AsyncResult[int] = AsyncResult(new_id(), backend, sent=sent)
    loop.call_later(0.02, sent.set_result, None)
    with anyio.fail_after(1):
        assert await result is result
        assert await result is result  # awaiting again is fine
    failed: asyncio.Future[None] = loop.create_future()
    failed.set_exception(OperationalError("broker down"))
    bad: AsyncResult[int] = AsyncResult(new_id(), backend, sent=failed)
    with pytest.raises(OperationalError, match="broker down"):
        await bad
    # And get() raises the send failure rather than waiting for a task that was never sent
    with pytest.raises(OperationalError):
        await bad.get(timeout=5)


async def test_get_waits_for_the_result_and_the_confirm_together(backend: MemoryBackend) -> None:
    loop = asyncio.get_running_loop()
    # Given a task whose result is stored while the broker's confirm of its message is still pending
    pending: asyncio.Future[None] = loop.create_future()
    tid = new_id()
    result: AsyncResult[int] = AsyncResult(tid, backend, sent=pending)
    loop.call_later(0.02, lambda: asyncio.ensure_future(backend.store(TaskMeta(tid, states.SUCCESS, 8))))
    # Then get() returns the result without waiting for the confirm, and leaves the send alone
    with anyio.fail_after(1):
        assert await result.get() == 8
    assert not pending.done()
    # And a send that fails while get() waits makes get() raise at once
    failing: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.02, failing.set_exception, OperationalError("broker down"))
    with anyio.fail_after(1), pytest.raises(OperationalError, match="broker down"):
        await AsyncResult(new_id(), backend, sent=failing).get(timeout=5)


async def test_cancelling_an_await_does_not_cancel_the_send(backend: MemoryBackend) -> None:
    sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    result: AsyncResult[int] = AsyncResult(new_id(), backend, sent=sent)
    with anyio.move_on_after(0.02):
        await result
    assert not sent.cancelled()
    sent.set_result(None)


async def test_an_unrebuildable_exception_comes_back_as_task_error(backend: MemoryBackend) -> None:
    tid = new_id()
    failure = {"exc_type": "Gone", "exc_module": "no_such_module_here", "exc_message": ["it broke"]}
    await backend.store(TaskMeta(tid, states.FAILURE, failure))
    with pytest.raises(TaskError) as raised:
        await AsyncResult(tid, backend).get(timeout=1)
    assert (raised.value.exc_type, raised.value.message) == ("Gone", "it broke")
    assert str(raised.value) == "Gone: it broke"


async def test_convert_rebuilds_the_value(backend: MemoryBackend) -> None:
    tid = new_id()
    await backend.store(TaskMeta(tid, states.SUCCESS, "42"))
    result = AsyncResult(tid, backend, convert=int)
    assert await result.get(timeout=1) == 42
    assert result.result == 42


def test_identity_equality_and_text(backend: MemoryBackend) -> None:
    a: AsyncResult[int] = AsyncResult("abc", backend)
    b: AsyncResult[int] = AsyncResult("abc", backend)
    assert a == b and a == "abc" and a != AsyncResult("other", backend)
    assert hash(a) == hash(b) and len({a, b}) == 1
    assert (str(a), repr(a)) == ("abc", "<AsyncResult: abc>")
    assert a.backend is backend
