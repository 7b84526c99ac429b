"""``task_always_eager``: ``delay()`` runs the task in this process, as Celery's eager mode.

A plain ``def`` task runs inside ``delay()``; an ``async def`` task starts at once as an asyncio task,
and awaiting the result (or ``get()``) waits for it. Results are kept in a process-local memory backend.
With ``task_eager_propagates`` the task's exception is raised by ``await result`` itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aqueue import states
from aqueue.ids import new_id
from aqueue.result.asyncresult import AsyncResult
from aqueue.result.base import TaskMeta, now_iso
from aqueue.result.failure import exception_to_result, format_traceback
from aqueue.result.memory import MemoryBackend
from aqueue.task import Context, Task, _request

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["apply_eager"]

_backend = MemoryBackend("memory://aqueue-eager")


def apply_eager(
    app: App,
    task: Task[Any, Any],
    args: Sequence[Any] | None,
    kwargs: dict[str, Any] | None,
    task_id: str | None,
) -> AsyncResult[Any]:
    """Run ``task`` here and return its result handle."""
    task_id = task_id or new_id()
    context = Context(
        id=task_id,
        task=task.name,
        args=tuple(args or ()),
        kwargs=dict(kwargs or {}),
        is_eager=True,
        called_directly=False,
    )
    propagate = app.conf.task_eager_propagates
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    if task.is_async:
        job = loop.create_task(_run_async(task, context, propagate))
        job.add_done_callback(lambda j: _settle(done, j))
    else:
        _settle_sync(done, task, context, propagate)
    return AsyncResult(task_id, _backend, sent=done, task_name=task.name)


async def _run_async(task: Task[Any, Any], context: Context, propagate: bool) -> None:
    token = _request.set(context)
    try:
        result = await task(*context.args, **context.kwargs)
    except Exception as exc:
        await _store_failure(context, exc)
        if propagate:
            raise
    else:
        await _backend.store(TaskMeta(str(context.id), states.SUCCESS, result, name=task.name))
    finally:
        _request.reset(token)


def _settle(done: asyncio.Future[None], job: asyncio.Task[None]) -> None:
    if job.cancelled():
        done.cancel()
    elif job.exception() is not None:
        done.set_exception(job.exception())  # type: ignore[arg-type]
    else:
        done.set_result(None)


def _settle_sync(done: asyncio.Future[None], task: Task[Any, Any], context: Context, propagate: bool) -> None:
    token = _request.set(context)
    try:
        result = task(*context.args, **context.kwargs)
        meta = TaskMeta(str(context.id), states.SUCCESS, result, name=task.name)
    except Exception as exc:
        meta = TaskMeta(str(context.id), states.FAILURE, exception_to_result(exc), format_traceback(exc))
        if propagate:
            done.set_exception(exc)
    finally:
        _request.reset(token)
    meta.date_done = now_iso()  # store() would set it, but it cannot be awaited here
    _backend._shared.results[meta.task_id] = _backend.serializer.dumps(meta.to_dict())
    if not done.done():
        done.set_result(None)


async def _store_failure(context: Context, exc: Exception) -> None:
    meta = TaskMeta(str(context.id), states.FAILURE, exception_to_result(exc), format_traceback(exc))
    await _backend.store(meta)
