"""Task: direct calls, bound tasks, the request context, and retry()'s decisions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aqueue import App, Task
from aqueue.exceptions import MaxRetriesExceededError, Retry
from aqueue.options import NOT_GIVEN, TaskOptions
from aqueue.task import Context, _request

MakeApp = Callable[..., App]


@pytest.fixture
def in_request() -> Iterator[Callable[..., None]]:
    """Run the rest of the test as if inside a worker, with the given request fields."""
    tokens = []

    def enter(**fields: Any) -> None:
        tokens.append(_request.set(Context(called_directly=False, **fields)))

    yield enter
    for token in reversed(tokens):
        _request.reset(token)


async def test_calling_a_task_runs_the_function_here(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def add(x: int, y: int) -> int:
        """Add two numbers."""
        return x + y

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    # Then an async task returns a coroutine to await, a sync one its value
    assert await add(2, 3) == 5
    assert mul(2, 3) == 6
    assert (add.is_async, mul.is_async) == (True, False)
    # And the task looks like its function
    assert (add.__name__, add.__doc__, add.__module__) == ("add", "Add two numbers.", __name__)
    assert add.__wrapped__.__name__ == "add"


def test_a_bound_task_gets_itself_first(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(bind=True)
    def who(self: Task[Any, Any], n: int) -> tuple[str, int]:
        return self.name, n

    assert who(3) == (who.name, 3)


def test_request_outside_a_worker_is_an_empty_direct_context(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    def job() -> None: ...

    request = job.request
    assert (request.id, request.retries, request.called_directly, request.is_eager) == (None, 0, True, False)


def test_request_inside_a_worker(make_app: MakeApp, in_request: Callable[..., None]) -> None:
    app = make_app()

    @app.task(bind=True)
    def job(self: Task[Any, Any]) -> Context:
        return self.request

    in_request(id="abc", task=job.name, retries=2)
    assert (job().id, job().retries, job().called_directly) == ("abc", 2, False)


def test_retry_with_countdown(make_app: MakeApp, in_request: Callable[..., None]) -> None:
    app = make_app()

    @app.task
    def job() -> None: ...

    in_request(id="x", retries=0)
    with pytest.raises(Retry) as raised:
        job.retry(countdown=5)
    assert raised.value.when == 5
    assert raised.value.exc is None


def test_retry_with_eta(make_app: MakeApp, in_request: Callable[..., None]) -> None:
    app = make_app()

    @app.task
    def job() -> None: ...

    in_request(id="x")
    with pytest.raises(Retry) as raised:
        job.retry(eta=datetime.now(UTC) + timedelta(seconds=30))
    assert raised.value.when is not None and 29 <= raised.value.when <= 30
    # And an eta in the past means at once
    with pytest.raises(Retry) as raised:
        job.retry(eta=datetime.now(UTC) - timedelta(seconds=30))
    assert raised.value.when == 0.0


def test_retry_delay_falls_back_from_task_to_setting(
    make_app: MakeApp, in_request: Callable[..., None]
) -> None:
    app = make_app(task_default_retry_delay=42)

    @app.task(default_retry_delay=7)
    def own() -> None: ...

    @app.task
    def default() -> None: ...

    in_request(id="x")
    with pytest.raises(Retry) as raised:
        own.retry()
    assert raised.value.when == 7
    with pytest.raises(Retry) as raised:
        default.retry()
    assert raised.value.when == 42


def test_retry_keeps_the_cause(make_app: MakeApp, in_request: Callable[..., None]) -> None:
    app = make_app()

    @app.task
    def job() -> None: ...

    in_request(id="x")
    cause = ConnectionError("flaky")
    with pytest.raises(Retry) as raised:
        job.retry(exc=cause, countdown=1)
    assert raised.value.exc is cause
    assert repr(raised.value) == "Retry(when=1, exc=ConnectionError('flaky'))"
    assert str(raised.value) == "Retry in 1s: ConnectionError('flaky')"


def test_past_max_retries_raises_max_retries_exceeded(
    make_app: MakeApp, in_request: Callable[..., None]
) -> None:
    app = make_app()

    @app.task(max_retries=2)
    def job() -> None: ...

    # Given the task already retried twice
    in_request(id="x", task=job.name, retries=2, args=(1,), kwargs={})
    # Then a third retry raises MaxRetriesExceededError naming the task
    with pytest.raises(MaxRetriesExceededError, match=rf"Can't retry {job.name}\[x\]"):
        job.retry(countdown=1)
    # Or the exception given, when there is one
    with pytest.raises(KeyError):
        job.retry(exc=KeyError("k"))
    # And max_retries on the call raises the limit
    with pytest.raises(Retry):
        job.retry(countdown=1, max_retries=5)


def test_max_retries_none_retries_for_ever(make_app: MakeApp, in_request: Callable[..., None]) -> None:
    app = make_app()

    @app.task(max_retries=None)
    def job() -> None: ...

    in_request(id="x", retries=10_000)
    with pytest.raises(Retry):
        job.retry(countdown=0)


def test_options_not_given_on_the_task_are_not_given() -> None:
    # "Not given" is NOT_GIVEN, never a value: max_retries=None (retry for ever) is a value
    options = TaskOptions()
    assert all(getattr(options, name) is NOT_GIVEN for name in TaskOptions.__dataclass_fields__)
    assert TaskOptions.of({"max_retries": None}).max_retries is None


def test_retry_eta_timing_is_relative_to_now(make_app: MakeApp, in_request: Callable[..., None]) -> None:
    app = make_app()

    @app.task
    def job() -> None: ...

    in_request(id="x")
    eta = datetime.fromtimestamp(time.time() + 2, UTC)
    with pytest.raises(Retry) as raised:
        job.retry(eta=eta)
    assert raised.value.when is not None and 1.5 < raised.value.when <= 2


def test_async_is_decided_at_decoration_seeing_through_partials_and_call(make_app: MakeApp) -> None:
    import functools

    app = make_app()

    async def add(x: int, y: int) -> int:
        return x + y

    class Callable_:
        async def __call__(self) -> None: ...

    # Then a partial of an async function and an object with an async __call__ are async tasks
    assert app.task(name="p")(functools.partial(add, 1)).is_async
    assert app.task(name="c")(Callable_()).is_async
    assert not app.task(name="s")(functools.partial(print, "x")).is_async
