"""Checked by mypy in CI (it is in mypy's files): typed task calls that must be accepted."""

from __future__ import annotations

from typing import Any, assert_type

from aqueue import App, AsyncResult, Task

app = App("typing", broker="memory://")


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
def shout(text: str) -> str:
    return text.upper()


@app.task(bind=True, max_retries=2)
async def bound(self: Task[Any, Any], n: int) -> list[int]:
    return [n] * self.request.retries


async def calls() -> None:
    result = add.delay(4, 4)
    assert_type(result, AsyncResult[int])
    assert_type(await result.get(timeout=1), int)
    assert_type(await add.delay(4, y=4), AsyncResult[int])
    assert_type(await shout.delay("hi").get(), str)
    assert_type(await bound.delay(3).get(), list[int])
    assert_type(add.apply_async((4, 4), countdown=1), AsyncResult[int])
