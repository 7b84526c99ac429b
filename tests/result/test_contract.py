"""The contract every result backend keeps, run on each store (memory, sqlite, redis)."""

from __future__ import annotations

import builtins
import uuid
from datetime import datetime

import anyio
import pytest

from aqueue import states
from aqueue.exceptions import TimeoutError
from aqueue.result import ResultBackend, TaskMeta


def task_id() -> str:
    return uuid.uuid4().hex


async def test_unknown_task_is_pending(backend: ResultBackend) -> None:
    # Given a task id nothing was stored for
    # When its state is read
    meta = await backend.get(task_id())
    # Then it is PENDING and not ready
    assert (meta.status, meta.result, meta.ready) == (states.PENDING, None, False)


async def test_stored_success_is_read_back_with_date_done(backend: ResultBackend) -> None:
    # Given a task that succeeded with a result
    tid = task_id()
    await backend.store(TaskMeta(tid, states.SUCCESS, {"sum": 8, "items": [1, "two"]}, name="tasks.add"))
    # When its state is read
    meta = await backend.get(tid)
    # Then the result and completion time come back (the name is not stored, as in Celery by default)
    assert (meta.task_id, meta.status, meta.result, meta.name) == (
        tid,
        states.SUCCESS,
        {"sum": 8, "items": [1, "two"]},
        None,
    )
    assert meta.traceback is None
    assert meta.date_done is not None
    datetime.fromisoformat(meta.date_done)


async def test_failure_round_trips_exception_and_traceback(backend: ResultBackend) -> None:
    # Given a task that failed
    tid = task_id()
    failure = {"exc_type": "ValueError", "exc_module": "builtins", "exc_message": "bad input"}
    traceback = 'Traceback (most recent call last):\n  File "tasks.py", line 3\nValueError: bad input\n'
    await backend.store(TaskMeta(tid, states.FAILURE, failure, traceback))
    # When its state is read
    meta = await backend.get(tid)
    # Then the exception description and the traceback are as stored
    assert (meta.status, meta.result, meta.traceback) == (states.FAILURE, failure, traceback)
    assert meta.ready


async def test_wait_returns_once_the_result_is_stored(backend: ResultBackend) -> None:
    # Given a waiter for a task that has no result yet
    tid = task_id()

    async def finish_later() -> None:
        await anyio.sleep(0.2)
        await backend.store(TaskMeta(tid, states.STARTED))
        await anyio.sleep(0.1)
        await backend.store(TaskMeta(tid, states.SUCCESS, 8))

    # When another task stores the result a little later
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_later)
            meta = await backend.wait(tid, timeout=4)
    # Then the waiter returns the final state
    assert (meta.status, meta.result) == (states.SUCCESS, 8)


async def test_wait_times_out_with_aqueue_timeout_error(backend: ResultBackend) -> None:
    # Given a task that never finishes
    # When a waiter gives it a short timeout
    with anyio.fail_after(5), pytest.raises(TimeoutError) as caught:
        await backend.wait(task_id(), timeout=0.2)
    # Then it raises aqueue's TimeoutError, which is also the builtin one
    assert isinstance(caught.value, builtins.TimeoutError)


async def test_forget_makes_the_task_pending_again(backend: ResultBackend) -> None:
    # Given a stored result
    tid = task_id()
    await backend.store(TaskMeta(tid, states.SUCCESS, 8))
    # When it is forgotten
    await backend.forget(tid)
    # Then the task reads as PENDING, and forgetting again is harmless
    assert (await backend.get(tid)).status == states.PENDING
    await backend.forget(tid)


async def test_started_is_not_ready(backend: ResultBackend) -> None:
    # Given a task that has started
    tid = task_id()
    await backend.store(TaskMeta(tid, states.STARTED))
    # When its state is read
    meta = await backend.get(tid)
    # Then it is STARTED, not ready, and has no completion time
    assert (meta.status, meta.ready, meta.date_done) == (states.STARTED, False, None)


async def test_a_later_state_replaces_the_earlier_one(backend: ResultBackend) -> None:
    # Given a task stored as STARTED
    tid = task_id()
    await backend.store(TaskMeta(tid, states.STARTED))
    # When it is stored again as SUCCESS
    await backend.store(TaskMeta(tid, states.SUCCESS, "done"))
    # Then the latest state is what is read
    meta = await backend.get(tid)
    assert (meta.status, meta.result) == (states.SUCCESS, "done")


async def test_a_chord_join_completes_once_with_parts_in_order(backend: ResultBackend) -> None:
    # Given a chord of three header tasks reporting out of order, one of them twice
    group_id = task_id()
    metas = [TaskMeta(f"t{i}", states.SUCCESS, i * 10) for i in range(3)]
    assert backend.supports_chords
    first = await backend.chord_join(group_id, 2, 3, metas[2])
    again = await backend.chord_join(group_id, 2, 3, TaskMeta("t2", states.SUCCESS, "a second copy"))
    assert (first.parts, first.first, again.parts, again.first) == (None, False, None, False)
    # When the last missing part comes
    done = await backend.chord_join(group_id, 0, 3, metas[0])
    assert done.parts is None
    done = await backend.chord_join(group_id, 1, 3, metas[1])
    # Then that report alone is first, and the parts are in header order, each counted once
    assert done.first and not done.sent and done.parts is not None
    assert [(p.task_id, p.result) for p in done.parts] == [("t0", 0), ("t1", 10), ("t2", 20)]
    # And a copy of any part is not first; each is told which part completed the join
    late = await backend.chord_join(group_id, 1, 3, metas[1])
    other = await backend.chord_join(group_id, 2, 3, metas[2])
    assert not late.first and not other.first
    assert done.completed_by == late.completed_by == other.completed_by == 1
    # And once its callback is sent, a late copy of a part fires nothing
    await backend.chord_sent(group_id)
    after = await backend.chord_join(group_id, 0, 3, metas[0])
    assert not after.first and (after.parts is None or after.sent)
