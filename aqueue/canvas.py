"""Signatures and workflows: Celery's canvas (``signature``, ``chain``, ``group``, ``chord``, ``map``...).

A :class:`Signature` is plain data, a dict as in Celery (``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``, ``chord_size``), so it travels inside messages and is rebuilt by the
worker with :func:`signature`. Sending a workflow sends only the tasks that can start; the rest travels
in their messages under Celery's protocol v2 names, and the worker that finishes a step sends the next:

- a **chain** sends its first step with ``chain`` = the other steps, last first; the worker that
  finishes a step pops the next one and sends it with the result as first argument (not for ``si``);
- a **group** sends each member with the group's id and the member's index;
- a **chord** sends its header as a group whose members carry the callback (``chord``, holding
  ``chord_size``); the result backend counts the header's results, and the worker whose task
  completes the count sends the callback with the results, in header order;
- ``link`` and ``link_error`` go in ``callbacks`` and ``errbacks``; on a workflow they are placed as
  Celery 5.7 places them: a chain's ``link`` on its last step and its ``link_error`` on every step; a
  chord's both on its callback (not on the header tasks: a failed header task fails the callback with
  ``ChordError``, and that calls the callback's errbacks).

Every task id is chosen when the workflow is sent ("frozen"), so the client's result handles exist at
once: a chain's result is its last step's, with ``parent`` the step before; a chord's is its
callback's, with ``parent`` the header's :class:`~aqueue.result.groupresult.GroupResult`.

A chain followed by a group is sent as a chord (``chain(group(...), cb)`` is ``chord(group(...), cb)``,
as in Celery); a group in a chord header is flattened into the header.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aqueue.exceptions import ImproperlyConfigured
from aqueue.message import Message
from aqueue.result.asyncresult import AsyncResult
from aqueue.result.groupresult import GroupResult

if TYPE_CHECKING:
    from aqueue.app import App
    from aqueue.task import Task

__all__ = [
    "Signature",
    "apply_signature",
    "register_builtins",
    "chain",
    "chord",
    "chunks",
    "group",
    "signature",
    "xmap",
    "xstarmap",
]

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
        if isinstance(other, Signature):
            return chain(self, other)
        return NotImplemented

    # Sending --------------------------------------------------------------------------------------

    def freeze(self, _id: str | None = None) -> Any:
        """Choose the task id(s) now, without sending; returns the result handle the send will give."""
        task_id = self.options.setdefault("task_id", _id or str(uuid.uuid4()))
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


# Chains ----------------------------------------------------------------------------------------------


class chain(Signature[Any]):
    """Tasks one after the other, each result the first argument of the next: ``chain(a.s(), b.s())``."""

    subtask_kind = "chain"

    def __init__(self, *tasks: Any, app: App | None = None, **options: Any) -> None:
        steps = list(tasks[0]) if len(tasks) == 1 and not isinstance(tasks[0], Mapping) else list(tasks)
        flat: list[Signature[Any]] = []
        for step in _signatures(steps, app):
            flat.extend(step.tasks if isinstance(step, chain) else [step])
        super().__init__("celery.chain", (), {"tasks": flat}, options, app=app or _app_of(flat))

    @property
    def tasks(self) -> list[Signature[Any]]:
        tasks = self.kwargs["tasks"] = _signatures(self.kwargs["tasks"], self._app)
        return tasks

    def __or__(self, other: Any) -> chain:  # type: ignore[override]
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app)
        return NotImplemented

    def _steps(self) -> list[Signature[Any]]:
        """The steps as they are sent: a group followed by a step becomes a chord."""
        steps: list[Signature[Any]] = []
        for step in self.tasks:
            if steps and isinstance(steps[-1], group):
                steps[-1] = chord(steps[-1], step, app=self._app)
            elif steps and isinstance(steps[-1], chord) and steps[-1].body is None:
                steps[-1]["kwargs"]["body"] = step
            else:
                steps.append(step)
        self.kwargs["tasks"] = steps
        return steps

    def freeze(self, _id: str | None = None) -> Any:
        steps = self._steps()
        if not steps:
            raise ImproperlyConfigured("A chain needs at least one task")
        results = [step.freeze() for step in steps[:-1]] + [steps[-1].freeze(_id)]
        for parent, child in itertools.pairwise(results):
            _set_parent(child, parent)
        return results[-1]

    def _send(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> AnyResult:
        result: AnyResult = self.freeze(options.pop("task_id", None))
        options = {**{k: v for k, v in self.options.items() if k != "task_id"}, **options}
        steps: list[Signature[Any]] = self.kwargs["tasks"]
        callbacks, errbacks = _pop_links(options)
        if callbacks or errbacks:  # as Celery: link on the last step, link_error on every step
            steps = [step._linked([], errbacks) for step in steps[:-1]] + [
                steps[-1]._linked(callbacks, errbacks)
            ]
        # The options that place the chain in an outer workflow belong to its last step.
        last = steps[-1]._last()
        for name in _PLACEMENT:
            if name in options:
                last.options[name] = options.pop(name)
        first, later = steps[0], steps[1:]
        if later:  # after its own steps, the rest of an outer chain (both last step first)
            options["chain"] = [*options.get("chain", ()), *(dict(step) for step in reversed(later))]
        first._send(args, kwargs, options)
        return result

    def _last(self) -> Signature[Any]:
        return self.tasks[-1]._last()


_PLACEMENT = ("group_id", "group_index", "chord")
"""Options that say where a task's result goes in an outer group or chord."""


# Groups ----------------------------------------------------------------------------------------------


class group(Signature[Any]):
    """Tasks run in parallel: ``group(add.s(i, i) for i in range(10))``; sending gives a GroupResult."""

    subtask_kind = "group"

    def __init__(self, *tasks: Any, app: App | None = None, **options: Any) -> None:
        members = list(tasks[0]) if len(tasks) == 1 and not isinstance(tasks[0], Mapping) else list(tasks)
        members_ = _signatures(members, app)
        super().__init__("celery.group", (), {"tasks": members_}, options, app=app or _app_of(members_))

    @property
    def tasks(self) -> list[Signature[Any]]:
        tasks = self.kwargs["tasks"] = _signatures(self.kwargs["tasks"], self._app)
        return tasks

    def __or__(self, other: Any) -> Any:
        if isinstance(other, chain):
            return chain(chord(self, other.tasks[0], app=self._app), *other.tasks[1:], app=self._app)
        if isinstance(other, Signature):
            return chord(self, other, app=self._app)
        return NotImplemented

    def freeze(self, _id: str | None = None) -> GroupResult:
        group_id = self.options.setdefault("task_id", _id or str(uuid.uuid4()))
        results = [member.freeze() for member in self.tasks]
        return GroupResult(group_id, results, backend=self.app.backend)

    def apply_async(  # type: ignore[override]
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        """Send every member, with partial arguments and options; returns the :class:`GroupResult`."""
        result: GroupResult = _apply(self, args, kwargs, {k: v for k, v in options.items() if v is not None})
        return result

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:  # type: ignore[override]
        return self.apply_async(args, kwargs)

    def _send(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> AnyResult:
        result = self.freeze(options.pop("task_id", None))
        own = {k: v for k, v in self.options.items() if k != "task_id"}
        for index, member in enumerate(self.tasks):
            member._send(args, kwargs, {**own, **options, "group_id": result.id, "group_index": index})
        return result


# Chords ----------------------------------------------------------------------------------------------


class chord(Signature[Any]):
    """A group, then a callback with the group's results: ``chord(header)(callback)``.

    The callback runs once, after the last header task, with the results in header order as its first
    argument. It needs a result backend that keeps the join (Redis, SQLite, memory).
    """

    subtask_kind = "chord"

    def __init__(
        self, header: Any, body: Mapping[str, Any] | None = None, *, app: App | None = None, **options: Any
    ) -> None:
        members = header.tasks if isinstance(header, group) else list(header)
        flat: list[Signature[Any]] = []
        for member in _signatures(members, app):
            flat.extend(
                member.tasks if isinstance(member, group) else [member]
            )  # a group in a header is flattened
        body_ = None if body is None else _signatures([body], app)[0]
        found = app or _app_of(flat) or (body_._app if body_ is not None else None)
        kwargs: dict[str, Any] = {"header": flat, "body": body_, "kwargs": {}}
        super().__init__("celery.chord", (), kwargs, options, app=found)
        if isinstance(header, group):
            self.options.setdefault("task_id", header.options.get("task_id"))

    @property
    def tasks(self) -> list[Signature[Any]]:
        tasks = self.kwargs["header"] = _signatures(self.kwargs["header"], self._app)
        return tasks

    @property
    def body(self) -> Signature[Any] | None:
        body = self.kwargs.get("body")
        if body is not None and not isinstance(body, Signature):
            body = self.kwargs["body"] = signature(body, app=self._app)
        return body

    def __call__(self, body: Mapping[str, Any] | None = None, **options: Any) -> AsyncResult[Any]:
        """``chord(header)(callback)``: send the chord with this callback."""
        if body is not None:
            self.kwargs["body"] = _signatures([body], self._app)[0]
        return self.apply_async(**options)

    def freeze(self, _id: str | None = None) -> AsyncResult[Any]:
        body = self.body
        if body is None:
            raise ImproperlyConfigured(
                "A chord needs a callback: chord(header)(callback) or chord(header, callback)"
            )
        if self.options.get("task_id") is None:
            self.options["task_id"] = str(uuid.uuid4())
        header = GroupResult(
            self.options["task_id"], [member.freeze() for member in self.tasks], backend=self.app.backend
        )
        result: AsyncResult[Any] = body.freeze(_id)
        _set_parent(result, header)
        return result

    def _send(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> AnyResult:
        app = self.app
        if self.body is None:
            raise ImproperlyConfigured(
                "A chord needs a callback: chord(header)(callback) or chord(header, callback)"
            )
        if not app.backend.supports_chords:
            raise ImproperlyConfigured(
                f"Chords need a result backend that keeps the join of their header, and {app.backend} "
                "does not: use a Redis or SQLite backend (result_backend='redis://...' or "
                "'sqlite:///results.db')."
            )
        result = self.freeze(options.pop("task_id", None))
        body = self.body
        assert body is not None
        options = {**{k: v for k, v in self.options.items() if k != "task_id"}, **options}
        callbacks, errbacks = _pop_links(options)
        if callbacks or errbacks:  # as Celery: on the callback, not on the header tasks
            body = body._linked(callbacks, errbacks)
        last = body._last()
        for name in (
            "chain",
            *_PLACEMENT,
        ):  # the rest of an outer chain, or an outer group, follows the callback
            if name in options:
                target = body if name == "chain" else last
                target.options[name] = options.pop(name)
        header = self.tasks
        if not header:  # nothing to wait for: the callback gets an empty list at once, as in Celery
            body._send(([],), {}, {k: v for k, v in options.items() if k in ("parent_id", "root_id")})
            return result
        callback = {**dict(body), "chord_size": len(header)}
        for index, member in enumerate(header):
            placed = {
                **options,
                "group_id": self.options["task_id"],
                "group_index": index,
                "chord": callback,
            }
            member._send(args, kwargs, placed)
        return result

    def _last(self) -> Signature[Any]:
        body = self.body
        assert body is not None
        return body._last()


# map, starmap, chunks ----------------------------------------------------------------------------------


class xmap(Signature[Any]):
    """``add.map([(1, 2), ...])``: one task that calls ``add`` on each item, in the worker."""

    subtask_kind = "xmap"
    builtin = "celery.map"

    def __init__(
        self, task: Mapping[str, Any], it: Iterable[Any], *, app: App | None = None, **options: Any
    ) -> None:
        sig = _signatures([task], app)[0]
        kwargs = {"task": sig, "it": [list(i) if isinstance(i, tuple) else i for i in it]}
        super().__init__(self.builtin, (), kwargs, options, immutable=True, app=app or sig._app)


class xstarmap(xmap):
    """``add.starmap([(1, 2), ...])``: one task that calls ``add(*item)`` for each item, in the worker."""

    subtask_kind = "xstarmap"
    builtin = "celery.starmap"


class chunks(Signature[Any]):
    """``add.chunks(items, n)``: the items split into tasks of ``n`` calls each; sending gives a GroupResult."""

    subtask_kind = "chunks"

    def __init__(
        self, task: Mapping[str, Any], it: Iterable[Any], n: int, *, app: App | None = None, **options: Any
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ImproperlyConfigured(f"chunks() takes a chunk size of at least 1, not {n!r}")
        sig = _signatures([task], app)[0]
        kwargs = {"task": sig, "it": [list(i) for i in it], "n": n}
        super().__init__("celery.chunks", (), kwargs, options, immutable=True, app=app or sig._app)

    def group(self) -> group:
        """The group of ``celery.starmap`` tasks this sends."""
        task, items, n = self.kwargs["task"], self.kwargs["it"], self.kwargs["n"]
        parts = [xstarmap(task, items[i : i + n], app=self._app) for i in range(0, len(items), n)]
        return group(parts, app=self._app, **self.options)

    def apply_async(  # type: ignore[override]
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        return self.group().apply_async(args, kwargs, **options)

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:  # type: ignore[override]
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None) -> GroupResult:
        return self.group().freeze(_id)

    def _send(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> AnyResult:
        return self.group()._send(args, kwargs, options)


def register_builtins(app: App) -> None:
    """The tasks behind ``map``, ``starmap`` and ``chunks``, under Celery's names, in ``app.builtins``."""
    from aqueue.options import TaskOptions
    from aqueue.task import Task

    async def xmap(task: Mapping[str, Any], it: list[Any]) -> list[Any]:
        return [await _call_here(app, task, (item,)) for item in it]

    async def xstarmap(task: Mapping[str, Any], it: list[Any]) -> list[Any]:
        return [await _call_here(app, task, tuple(item)) for item in it]

    async def chunked(task: Mapping[str, Any], it: list[Any], n: int) -> None:
        await chunks(task, it, n, app=app).group().apply_async()

    for name, fn in (("celery.map", xmap), ("celery.starmap", xstarmap), ("celery.chunks", chunked)):
        app.builtins[name] = Task(app, fn, name, False, TaskOptions())


async def _call_here(app: App, task: Mapping[str, Any], args: tuple[Any, ...]) -> Any:
    """Call ``task``'s function in this process: a coroutine is awaited, a plain function runs in a thread."""
    sig = signature(task, app=app)
    target = app.tasks.get(sig.task) or app.builtins.get(sig.task)
    if target is None:
        from aqueue.exceptions import NotRegistered

        raise NotRegistered(sig.task)
    merged_args, merged_kwargs, _ = sig._merge(args, None, None)
    if target.is_async:
        return await target(*merged_args, **merged_kwargs)
    import anyio.to_thread

    return await anyio.to_thread.run_sync(functools.partial(target, *merged_args, **merged_kwargs))


# Helpers -----------------------------------------------------------------------------------------------


def _app_of(sigs: Iterable[Signature[Any]]) -> App | None:
    return next((sig._app for sig in sigs if sig._app is not None), None)


def _set_parent(child: Any, parent: Any) -> None:
    if isinstance(child, AsyncResult | GroupResult):
        child.parent = parent
