"""Signatures: one task call as plain data (Celery's ``add.s(2, 2)``), and sending any of them.

:class:`Signature` is the base of every workflow kind (:mod:`aqueue.canvas.workflows`,
:mod:`aqueue.canvas.mapping`): a subclass names its ``subtask_kind`` and :func:`signature` rebuilds it
from plain data. :func:`apply_signature` is the one way a signature of any kind is sent.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aqueue.exceptions import ImproperlyConfigured
from aqueue.ids import new_id
from aqueue.message import Message
from aqueue.result.asyncresult import AsyncResult
from aqueue.result.groupresult import GroupResult

if TYPE_CHECKING:
    from aqueue.app import App
    from aqueue.canvas.workflows import chain
    from aqueue.task import Task

__all__ = ["AnyResult", "Signature", "apply_signature", "signature"]

R = TypeVar("R")
AnyResult = AsyncResult[Any] | GroupResult
_TYPES: dict[str, type[Signature[Any]]] = {}


class Signature(dict[str, Any], Generic[R]):
    """One task call as plain data: Celery's ``add.s(2, 2)``, ``add.si(2, 2)``, ``signature('tasks.add')``.

    Parameters:
        task: the task, its name, or a signature (dict) to copy.
        args, kwargs: the arguments; more can be given when it is sent (partial arguments: given
            positional arguments go first, given keyword arguments are merged), unless ``immutable``.
        options: ``apply_async`` options used when it is sent (``countdown``, ``queue``, ``link``, ...).
        app: the app that sends it (else the task's, else the most recently created app).
    """

    subtask_kind: str | None = None

    def __init__(
        self,
        task: str | Task[Any, R] | Mapping[str, Any] | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: App | None = None,
        **extra_options: Any,
    ) -> None:
        self._app = app
        if isinstance(task, Mapping):
            super().__init__(copy.deepcopy(dict(task)))
            self.setdefault("args", ())
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("subtask_type", None)
            self.setdefault("immutable", False)
            return
        name = getattr(task, "name", task)
        if self._app is None and not isinstance(task, str | None):
            self._app = getattr(task, "app", None)
        super().__init__(
            task=name,
            args=tuple(args or ()),
            kwargs=dict(kwargs or {}),
            options={**(options or {}), **extra_options},
            subtask_type=subtask_type if subtask_type is not None else self.subtask_kind,
            immutable=immutable,
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.subtask_kind is not None:
            _TYPES[cls.subtask_kind] = cls

    # Fields, under Celery's names -----------------------------------------------------------------

    @property
    def task(self) -> str:
        return str(self["task"])

    name = task

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = self["kwargs"]
        return kwargs

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = self["options"]
        return options

    @property
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def id(self) -> str | None:
        """The task id, once frozen or set with ``set(task_id=...)``."""
        return self.options.get("task_id")

    @property
    def app(self) -> App:
        """The app that sends this signature.

        Raises:
            AqueueError: no app is known (create one, or build the signature from a task).
        """
        if self._app is None:
            from aqueue.app import current_app

            self._app = current_app()
        return self._app

    # Building -------------------------------------------------------------------------------------

    def clone(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature[R]:
        """A copy, with partial arguments and options merged in."""
        cloned = signature(copy.deepcopy(dict(self)), app=self._app)
        cloned["args"], cloned["kwargs"], cloned["options"] = cloned._merge(args, kwargs, options)
        return cloned

    def set(self, immutable: bool | None = None, **options: Any) -> Signature[R]:
        """Set options (``countdown``, ``queue``, ``link``, ...) in place; returns the signature."""
        if immutable is not None:
            self["immutable"] = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Send ``callback`` with this task's result when it succeeds; returns the callback."""
        self._add_option("link", callback)
        return callback

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Call ``errback`` when this task fails; returns the errback."""
        self._add_option("link_error", errback)
        return errback

    def on_error(self, errback: Mapping[str, Any]) -> Signature[R]:
        """:meth:`link_error`, returning this signature."""
        self.link_error(errback)
        return self

    def _add_option(self, name: str, value: Mapping[str, Any]) -> None:
        self.options[name] = [*_listed(self.options.get(name)), value]

    def _linked(self, callbacks: list[Mapping[str, Any]], errbacks: list[Mapping[str, Any]]) -> Signature[R]:
        """A copy with ``callbacks`` added to its ``link`` and ``errbacks`` to its ``link_error``."""
        linked = self.clone()
        for name, added in (("link", callbacks), ("link_error", errbacks)):
            if added:
                linked.options[name] = [*_listed(linked.options.get(name)), *added]
        return linked

    def _merge(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, options: Mapping[str, Any] | None
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        merged_options = {**self.options, **(options or {})}
        if self.immutable:
            return self.args, dict(self.kwargs), merged_options
        return (*(args or ()), *self.args), {**self.kwargs, **(kwargs or {})}, merged_options

    def __or__(self, other: Any) -> chain:  # type: ignore[override]
        from aqueue.canvas.workflows import chain

        if isinstance(other, Signature):
            return chain(self, other)
        return NotImplemented

    # Sending --------------------------------------------------------------------------------------

    def freeze(self, _id: str | None = None) -> Any:
        """Choose the task id(s) now, without sending; returns the result handle the send will give."""
        task_id = self.options.setdefault("task_id", _id or new_id())
        app = self.app
        expected = Message(task_id, self.task)
        app.backend.prepare(expected)  # rpc:// replies of steps a worker sends still come to this client
        if expected.reply_to:
            self.options.setdefault("reply_to", expected.reply_to)
        return app.AsyncResult(task_id)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[R]:
        """Send it, with partial arguments and options merged in; returns its :class:`AsyncResult`."""
        result: AsyncResult[R] = _apply(
            self, args, kwargs, {k: v for k, v in options.items() if v is not None}
        )
        return result

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        """:meth:`apply_async` with star arguments as the partial arguments."""
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task's function here, as a plain call (a coroutine for an ``async def``)."""
        merged_args, merged_kwargs, _ = self._merge(args, kwargs, None)
        return self.app.tasks[self.task](*merged_args, **merged_kwargs)

    def _send(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> AnyResult:
        merged_args, merged_kwargs, merged_options = self._merge(args, kwargs, options)
        result = self.app.send_task(self.task, merged_args, merged_kwargs, **merged_options)
        sink = _publishes.get()
        if sink is not None and result._sent is not None:
            sink.append(result._sent)
        return result

    def _last(self) -> Signature[Any]:
        """The task whose result is this signature's result (a chain's last step, a chord's callback)."""
        return self

    def __repr__(self) -> str:
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}({', '.join(shown)}){'!' if self.immutable else ''}"

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature[R]:
        return signature(copy.deepcopy(dict(self), memo), app=self._app)


def signature(
    varies: str | Mapping[str, Any], *args: Any, app: App | None = None, **kwargs: Any
) -> Signature[Any]:
    """Celery's ``signature()``: from a task name and arguments, or a signature as plain data.

    A dict's ``subtask_type`` (chain, group, chord, xmap, xstarmap, chunks) picks its class.
    """
    if isinstance(varies, Mapping):
        kind = _TYPES.get(varies.get("subtask_type") or "", Signature)
        made = kind.__new__(kind)
        Signature.__init__(made, varies, app=app)
        return made
    return Signature(varies, *args, app=app, **kwargs)


def _listed(value: Any) -> list[Mapping[str, Any]]:
    """A ``link`` or ``link_error`` option as a list: none, one signature, or several."""
    return [] if value is None else [value] if isinstance(value, Mapping) else list(value)


def _pop_links(options: dict[str, Any]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Take ``link`` and ``link_error`` out of ``options``: a workflow places them on its own tasks."""
    return _listed(options.pop("link", None)), _listed(options.pop("link_error", None))


def _signatures(tasks: Iterable[Any], app: App | None) -> list[Signature[Any]]:
    out = []
    for task in tasks:
        if not isinstance(task, Mapping):
            raise ImproperlyConfigured(f"A workflow takes signatures (task.s(...)), not {task!r}")
        out.append(task if isinstance(task, Signature) else signature(task, app=app))
    return out


_publishes: ContextVar[list[asyncio.Future[None]] | None] = ContextVar("aqueue_publishes", default=None)
"""While a workflow is being sent: the publish futures of its messages."""


def _apply(
    sig: Signature[Any], args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, options: dict[str, Any]
) -> Any:
    """Send ``sig``; awaiting the result it returns waits until the broker accepted every message sent."""
    sink: list[asyncio.Future[None]] = []
    token = _publishes.set(sink)
    try:
        result = sig._send(tuple(args or ()), dict(kwargs or {}), options)
    finally:
        _publishes.reset(token)
    if not (isinstance(result, AsyncResult) and len(sink) == 1 and result._sent is sink[0]):
        result._sent = _all(sink)
    return result


def _all(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    gathered = asyncio.gather(*futures)
    gathered.add_done_callback(_retrieved)  # a failure nobody awaits is not logged as unretrieved
    return gathered  # type: ignore[return-value]


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def apply_signature(
    sig: Signature[Any], args: Sequence[Any], kwargs: Mapping[str, Any], options: dict[str, Any]
) -> Any:
    """Send ``sig`` (of any kind) and wait until the broker accepted every message; returns its result."""
    result = _apply(sig, args, kwargs, options)
    await result
    return result


def _app_of(sigs: Iterable[Signature[Any]]) -> App | None:
    return next((sig._app for sig in sigs if sig._app is not None), None)
