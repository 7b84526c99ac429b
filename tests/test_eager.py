"""task_always_eager: delay() runs the task in this process, as Celery's eager mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aqueue import App, Task, states
from aqueue.exceptions import NotRegistered

MakeApp = Callable[..., App]


@pytest.fixture
def app(make_app: MakeApp) -> App:
    return make_app(task_always_eager=True)


async def test_async_task_runs_here_and_get_returns_its_value(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(4, 4)
    with anyio.fail_after(1):
        assert await result.get() == 8
    assert result.state == states.SUCCESS
    assert result.date_done is not None


async def test_sync_task_runs_inside_delay(app: App) -> None:
    ran: list[int] = []

    @app.task
    def record(n: int) -> int:
        ran.append(n)
        return n

    result = record.delay(3)
    # Then it already ran before anything was awaited
    assert ran == [3]
    assert await result.get(timeout=1) == 3
    assert (result.state, result.traceback) == (states.SUCCESS, None)
    assert result.date_done is not None


@pytest.mark.parametrize("sync", [True, False], ids=["def", "async-def"])
async def test_failure_is_stored_and_reraised_by_get(app: App, sync: bool) -> None:
    def boom() -> None:
        raise KeyError("missing")

    async def aboom() -> None:
        boom()

    task: Task[[], None] = app.task(name=f"tasks.boom{sync}")(boom if sync else aboom)
    result = task.delay()
    # Then the send itself succeeds, and get() re-raises with the traceback kept
    with anyio.fail_after(1):
        await result
        with pytest.raises(KeyError, match="missing"):
            await result.get()
    assert result.state == states.FAILURE
    assert result.traceback is not None and "KeyError" in result.traceback
    assert result.date_done is not None


@pytest.mark.parametrize("sync", [True, False], ids=["def", "async-def"])
async def test_eager_propagates_raises_on_await(make_app: MakeApp, sync: bool) -> None:
    app = make_app(task_always_eager=True, task_eager_propagates=True)

    def boom() -> None:
        raise ValueError("now")

    async def aboom() -> None:
        boom()

    task: Task[[], None] = app.task(name=f"tasks.boom{sync}")(boom if sync else aboom)
    with anyio.fail_after(1), pytest.raises(ValueError, match="now"):
        await task.delay()


async def test_the_request_is_eager(app: App) -> None:
    @app.task(bind=True)
    async def who(self: Task[Any, Any], x: int, y: int) -> list[Any]:
        return [self.request.id, self.request.is_eager, self.request.called_directly, list(self.request.args)]

    result = who.apply_async((1, 2), task_id="eager-id")
    assert await result.get(timeout=1) == ["eager-id", True, False, [1, 2]]


def test_an_unregistered_name_raises_at_once(app: App) -> None:
    with pytest.raises(NotRegistered, match=r"tasks\.nowhere"):
        app.send_task("tasks.nowhere")
