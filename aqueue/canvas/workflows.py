"""The composite workflows: ``chain``, ``group`` and ``chord``, and how each is sent.

Each is a :class:`~aqueue.canvas.signatures.Signature` whose ``kwargs`` hold its members, so it travels
as plain data. Sending one sends only the tasks that can start, the rest riding in their messages
(see :mod:`aqueue.canvas`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aqueue.canvas.signatures import AnyResult, Signature, _app_of, _apply, _pop_links, _signatures, signature
from aqueue.exceptions import ImproperlyConfigured
from aqueue.ids import new_id
from aqueue.result.asyncresult import AsyncResult
from aqueue.result.groupresult import GroupResult

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["chain", "chord", "group"]


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
        group_id = self.options.setdefault("task_id", _id or new_id())
        results = [member.freeze() for member in self.tasks]
        return GroupResult(group_id, results, backend=self.app.backend)

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """As Celery: on the first member only, made immutable; a callback after the whole group is a chord."""
        self.tasks[0].link(signature(callback, app=self._app).clone().set(immutable=True))
        return callback

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """As Celery: on every member, so the errback may run once per failed member."""
        for member in self.tasks:
            member.link_error(signature(errback, app=self._app).clone())
        return errback

    def _linked(self, callbacks: list[Mapping[str, Any]], errbacks: list[Mapping[str, Any]]) -> group:
        linked = self.clone()
        for callback in callbacks:
            linked.link(callback)
        for errback in errbacks:
            linked.link_error(errback)
        return linked  # type: ignore[return-value]

    def apply_async(  # type: ignore[override]
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        """Send every member, with partial arguments and options; returns the :class:`GroupResult`."""
        if options.get("link") is not None:
            raise TypeError(
                "Cannot add link to group: use a chord (chord(group)(callback) or group | callback)"
            )
        if options.get("link_error") is not None:
            raise TypeError(
                "Cannot add link_error to group: set it on each task (task.s().on_error(errback))"
            )
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
            self.options["task_id"] = new_id()
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


def _set_parent(child: Any, parent: Any) -> None:
    if isinstance(child, AsyncResult | GroupResult):
        child.parent = parent
