"""Pydantic models as task arguments and results: sent as data, rebuilt from the task's type hints."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from aqueue import App, Task
from aqueue.exceptions import TaskError
from aqueue.testing import running_worker

app = App("models")


class Point(BaseModel):
    x: int
    y: int


@app.task(name="models.shift")
async def shift(p: Point, dx: int) -> Point:
    assert isinstance(p, Point)
    return Point(x=p.x + dx, y=p.y)


@app.task(name="models.centroid")
def centroid(points: list[Point]) -> Point | None:
    if not points:
        return None
    return Point(x=sum(p.x for p in points) // len(points), y=sum(p.y for p in points) // len(points))


@app.task(name="models.bound", bind=True)
async def bound(self: Task[Any, Any], p: Point) -> int:
    return p.x + self.request.retries


@app.task(name="models.plain")
async def plain(x: int) -> dict[str, int]:
    return {"x": x}


async def test_model_argument_and_result_come_back_as_models() -> None:
    async with running_worker(app):
        # When a model is sent and the task returns one
        result = await shift.delay(Point(x=1, y=2), 3).get(timeout=5)
    # Then the worker got a Point and the caller gets a Point back
    assert result == Point(x=4, y=2)
    assert type(result) is Point


async def test_list_of_models_in_a_thread_task_and_optional_result() -> None:
    async with running_worker(app):
        assert await centroid.delay([Point(x=0, y=0), Point(x=2, y=4)]).get(timeout=5) == Point(x=1, y=2)
        assert await centroid.delay([]).get(timeout=5) is None


async def test_bound_task_with_model_argument() -> None:
    async with running_worker(app):
        assert await bound.delay(Point(x=7, y=0)).get(timeout=5) == 7


async def test_invalid_model_data_fails_at_the_worker_naming_the_field() -> None:
    async with running_worker(app):
        # When raw data that does not fit the model reaches the worker
        result = app.send_task("models.shift", [{"x": "not a number", "y": 2}, 1])
        with pytest.raises(TaskError) as caught:
            await result.get(timeout=5)
    # Then the error says which field failed validation
    assert caught.value.exc_type == "ValidationError"
    assert "0.x" in str(caught.value)
    assert "valid integer" in str(caught.value)


async def test_tasks_without_models_are_called_unwrapped() -> None:
    # Then the worker calls the plain function, with no validation cost
    assert plain.checked_fn is plain.fn
    assert plain.result_type is None
    assert shift.checked_fn is not shift.fn
