"""Task[P, R]: a registered function with Celery's calling API, typed with ParamSpec."""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypedDict, TypeVar, Unpack

import pydantic

from aqueue._compat import is_async_callable
from aqueue.exceptions import MaxRetriesExceededError, Retry

if TYPE_CHECKING:
    from aqueue.app import App
    from aqueue.result.asyncresult import AsyncResult

__all__ = ["Context", "SendOptions", "Task", "TaskOptionArgs", "TaskOptions"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options set on the task; ``None`` means: fall back to the app's settings."""

    ignore_result: bool | None = None
    rate_limit: str | float | None = None
    global_rate_limit: str | float | None = None
    acks_late: bool | None = None
    queue: str | None = None
    serializer: str | None = None
    max_retries: int | None = 3
    default_retry_delay: float | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    track_started: bool | None = None
    priority: int | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()


class SendOptions(TypedDict, total=False):
    """The options of ``apply_async`` and ``send_task``."""

    task_id: str | None
    queue: str | None
    """Overrides task_routes and the task's own queue."""
    countdown: float | None
    """Seconds from now before the task may start."""
    eta: datetime | float | None
    """When the task may start: a datetime (naive: in the app's zone) or a unix time."""
    expires: datetime | float | None
    """Seconds from now, or a datetime, after which the task is revoked instead of run."""
    headers: dict[str, Any] | None
    ignore_result: bool | None
    serializer: str | None
    priority: int | None


class TaskOptionArgs(TypedDict, total=False):
    """The keyword options ``@app.task(...)`` takes (see :class:`TaskOptions`)."""

    ignore_result: bool
    rate_limit: str | float | None
    global_rate_limit: str | float | None
    acks_late: bool
    queue: str
    serializer: str
    max_retries: int | None
    default_retry_delay: float
    time_limit: float | None
    soft_time_limit: float | None
    track_started: bool
    priority: int | None
    autoretry_for: tuple[type[BaseException], ...]


@dataclass(slots=True)
class Context:
    """What a bound task sees as ``self.request`` while it runs."""

    id: str | None = None
    task: str | None = None
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: float | None = None
    expires: float | None = None
    hostname: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] | None = None
    is_eager: bool = False
    called_directly: bool = True


_request: ContextVar[Context] = ContextVar("aqueue_request")
_DIRECT = Context()


class Task(Generic[P, R]):
    """A function registered with an :class:`~aqueue.App`.

    ``task(...)`` runs it here; ``task.delay(...)`` / ``task.apply_async(...)`` send it to a worker.
    """

    def __init__(self, app: App, fn: Callable[..., Any], name: str, bind: bool, options: TaskOptions) -> None:
        self.app, self.fn, self.name, self.bind, self.options = app, fn, name, bind, options
        self.is_async = is_async_callable(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self.__module__ = fn.__module__
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function in this process, as a plain call (a coroutine for an ``async def``)."""
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments; returns at once. ``await`` the result to confirm the send."""
        return self.app.send_task(self.name, args, kwargs, task=self)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult[R]:
        """Send the task with options, as Celery's ``apply_async`` (the options are :class:`SendOptions`).

        Raises:
            EncodeError: an argument cannot be serialized (it is named).
        """
        return self.app.send_task(self.name, args, kwargs, task=self, **options)

    @cached_property
    def checked_fn(self) -> Callable[..., Any]:
        """The function the worker calls: validating its arguments when its hints name pydantic models.

        Models travel as plain data; the worker turns them back into the hinted model types (a failure
        names the field), and other hinted arguments are validated alongside.
        """
        hints = _hints(self.fn)
        hints.pop("return", None)
        if not any(_has_model(hint) for hint in hints.values()):
            return self.fn
        return pydantic.validate_call(config=pydantic.ConfigDict(arbitrary_types_allowed=True))(self.fn)

    @cached_property
    def result_type(self) -> Callable[[Any], Any] | None:
        """Turns a stored result back into the hinted return type when that names a pydantic model."""
        hint = _hints(self.fn).get("return")
        if hint is None or not _has_model(hint):
            return None
        return pydantic.TypeAdapter(hint).validate_python

    @property
    def request(self) -> Context:
        """The request being run, inside a worker; an empty context for a direct call."""
        return _request.get(_DIRECT)

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        max_retries: int | None = None,
    ) -> NoReturn:
        """Ask the worker to run this task again later; raise what this returns: ``raise self.retry()``.

        Raises:
            Retry: always, unless the retry limit is reached.
            MaxRetriesExceededError: past ``max_retries`` (or ``exc`` itself, when given).
        """
        request = self.request
        limit = self.options.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        if eta is not None:
            when = eta.timestamp() - time.time()
        elif countdown is not None:
            when = countdown
        else:
            delay = self.options.default_retry_delay
            when = self.app.conf.task_default_retry_delay if delay is None else delay
        raise Retry(exc=exc, when=max(0.0, when))

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main or '__main__'}>"


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _has_model(hint: Any) -> bool:
    """Whether a type hint names a pydantic model anywhere (``Model``, ``list[Model]``, ``Model | None``)."""
    if isinstance(hint, type) and issubclass(hint, pydantic.BaseModel):
        return True
    return any(_has_model(arg) for arg in typing.get_args(hint))
