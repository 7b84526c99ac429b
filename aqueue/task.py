"""Task[P, R]: a registered function with Celery's calling API, typed with ParamSpec."""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, Unpack

import pydantic

from aqueue._compat import is_async_callable
from aqueue.canvas import Signature, chunks, xmap, xstarmap
from aqueue.exceptions import MaxRetriesExceededError, Retry
from aqueue.options import ResolvedOptions, SendOptions, TaskOptionArgs, TaskOptions

if TYPE_CHECKING:
    from aqueue.app import App
    from aqueue.result.asyncresult import AsyncResult

__all__ = ["Context", "SendOptions", "Task", "TaskOptionArgs", "TaskOptions"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(slots=True, kw_only=True)
class Context:
    """What a bound task sees as ``self.request`` while it runs (Celery's names)."""

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
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
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

    # Signatures (Celery's canvas) ---------------------------------------------------------------

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature of this task with these (partial) arguments: ``add.s(2)``."""
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """An immutable signature: a chain or callback does not add its result to these arguments."""
        return Signature(self, args, kwargs, immutable=True)

    def signature(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Signature[R]:
        """A signature with ``apply_async`` options: ``add.signature((2, 2), countdown=10)``."""
        immutable = bool(options.pop("immutable", False))
        return Signature(self, args, kwargs, options, immutable=immutable)

    subtask = signature

    def map(self, it: Iterable[Any]) -> xmap:
        """One task that calls this one on each item, in the worker: ``add.map([1, 2])``."""
        return xmap(self.s(), it)

    def starmap(self, it: Iterable[Sequence[Any]]) -> xstarmap:
        """One task that calls ``this(*item)`` for each item, in the worker."""
        return xstarmap(self.s(), it)

    def chunks(self, it: Iterable[Sequence[Any]], n: int) -> chunks:
        """The items in tasks of ``n`` calls each; ``.delay()`` gives a GroupResult of lists."""
        return chunks(self.s(), it, n)

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
    def resolved(self) -> ResolvedOptions:
        """This task's options after resolution (the call aside): task > annotation > setting."""
        return self.app.options_for(self.name)

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
        request, resolved = self.request, self.resolved
        limit = resolved.max_retries if max_retries is None else max_retries
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
            when = resolved.default_retry_delay
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
