"""``map``, ``starmap`` and ``chunks``: many calls of one task, run by Celery's builtin tasks in the worker."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aqueue.canvas.signatures import AnyResult, Signature, _signatures, signature
from aqueue.canvas.workflows import group
from aqueue.exceptions import ImproperlyConfigured
from aqueue.result.groupresult import GroupResult

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["chunks", "register_builtins", "xmap", "xstarmap"]


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
