"""What a worker does after a task that is part of a workflow: the next steps, or the failure's reach.

After a success: each ``link`` callback is sent with the result as first argument, then the next step of
the chain, then, for a chord header task, its part is reported to the result backend; the task whose
part completes the chord sends the callback with every result, in header order. After a failure: the
rest of the chain is stored as failed with the same exception (so ``get()`` on the chain's result
raises it), a chord header part is reported as failed (the callback is then stored as failed with
:class:`~aqueue.exceptions.ChordError` instead of running), and each ``link_error`` errback is called.

Everything here is awaited before the task's message is acknowledged, publishes included, so a worker
that dies half-way leaves its message to be delivered again (late acks) rather than a workflow cut short.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from aqueue import states
from aqueue.canvas import Signature, apply_signature, chord, group, signature
from aqueue.exceptions import ChordError, NotRegistered
from aqueue.message import Message
from aqueue.result.base import TaskMeta
from aqueue.result.failure import exception_from_result, exception_to_result
from aqueue.task import Context

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["Workflow"]

logger = logging.getLogger("aqueue.worker")


class Workflow:
    """Sends a workflow on after each of its tasks; one per worker."""

    def __init__(self, app: App) -> None:
        self.app, self.backend = app, app.backend

    async def succeeded(self, message: Message, result: Any) -> None:
        """Send the callbacks and the next step; report a chord part."""
        for callback in message.callbacks or ():
            await self._send(callback, (result,), message)
        if message.chain:
            rest = list(message.chain)
            await self._send(rest.pop(), (result,), message, chain=rest or None)
        if message.chord is not None:
            await self.chord_part(message, TaskMeta(message.id, states.SUCCESS, result, name=message.task))

    async def failed(self, message: Message, exc: BaseException, traceback: str | None) -> None:
        """Fail the rest of the chain, report a chord part, call the errbacks."""
        stored = exception_to_result(exc)
        for step in message.chain or ():
            for last in _outcomes(signature(step, app=self.app)):
                request = _message_of(last)
                await self.backend.store(TaskMeta(request.id, states.FAILURE, stored, traceback), request)
        if message.chord is not None:
            await self.chord_part(
                message, TaskMeta(message.id, states.FAILURE, stored, traceback, name=message.task)
            )
        for errback in message.errbacks or ():
            await self._errback(errback, message, exc, traceback)

    async def chord_part(self, message: Message, meta: TaskMeta, *, recovering: bool = False) -> None:
        """Report a header task's final state; the part that completes the chord sends its callback.

        ``recovering``: the message came again after its task had finished (its worker may have died
        between the join and the callback's publish); the callback is sent if this part completed the
        join, the callback was not sent yet, and it is not already finished. A copy of any other part
        sends nothing: several copies coming again at once send the callback once.
        """
        body, group_id = message.chord, message.group
        if body is None or group_id is None or message.group_index is None:
            return
        size = int(body.get("chord_size") or 0)
        join = await self.backend.chord_join(group_id, message.group_index, size, meta)
        mine = join.first or (recovering and join.completed_by == message.group_index)
        if join.parts is None or join.sent or not mine:
            return
        callback = signature(body, app=self.app)
        if recovering and callback.id is not None and (await self.backend.get(callback.id)).ready:
            return
        failed = next((part for part in join.parts if part.status != states.SUCCESS), None)
        if failed is None:
            await self._send(callback, ([part.result for part in join.parts],), message)
        else:
            await self._chord_failed(callback, failed)
        await self.backend.chord_sent(group_id)

    async def recover(self, message: Message) -> None:
        """A copy of a finished chord header task came again: report its part once more, as recovering."""
        meta = await self.backend.get(message.id)
        if meta.ready:
            await self.chord_part(message, meta, recovering=True)

    async def _chord_failed(self, callback: Signature[Any], failed: TaskMeta) -> None:
        cause = exception_from_result(failed.result)
        error = ChordError(f"Dependency {failed.task_id} raised {cause!r}")
        logger.error("Chord callback %s[%s] not run: %s", callback.task, callback.id, error)
        body = _message_of(callback)
        await self.backend.store(
            TaskMeta(body.id, states.FAILURE, exception_to_result(error), name=body.task), body
        )
        await self.failed(body, error, None)

    async def _send(
        self, sig: Mapping[str, Any], args: Sequence[Any], parent: Message, **options: Any
    ) -> None:
        step = sig if isinstance(sig, Signature) else signature(sig, app=self.app)
        placed = {"parent_id": parent.id, "root_id": parent.root}
        placed.update((k, v) for k, v in options.items() if v is not None)
        await apply_signature(step, args, {}, placed)

    async def _errback(
        self, errback: Mapping[str, Any], message: Message, exc: BaseException, traceback: str | None
    ) -> None:
        """Call ``errback`` as Celery does: ``err(request, exc, traceback)`` here when the task is
        registered and takes those arguments, else send it as a task with the failed task's id."""
        sig = signature(errback, app=self.app)
        task = self.app.tasks.get(sig.task)
        try:
            if task is not None and not sig.immutable and _takes_request(task.fn, task.bind, len(sig.args)):
                request = Context(id=message.id, task=message.task, args=message.args, kwargs=message.kwargs,
                                  root_id=message.root, parent_id=message.parent_id, group=message.group,
                                  called_directly=False)  # fmt: skip
                call = sig.clone((request, exc, traceback))
                if task.is_async:
                    await call()
                else:
                    await anyio.to_thread.run_sync(call)
            else:
                await self._send(sig, (message.id,), message)
        except NotRegistered:
            await self._send(sig, (message.id,), message)
        except Exception:
            logger.exception("Errback %s of task %s[%s] raised", sig.task, message.task, message.id)


def _takes_request(fn: Any, bound: bool, given: int) -> bool:
    """Whether ``fn`` takes more than one positional argument besides ``given`` (Celery's test)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) - int(bound) - given > 1


def _outcomes(step: Signature[Any]) -> list[Signature[Any]]:
    """The tasks whose states stand for ``step``'s outcome: itself, a chord's callback, a group's members."""
    if isinstance(step, chord):
        body = step.body
        return [] if body is None else _outcomes(body._last())
    if isinstance(step, group):
        return [last for member in step.tasks for last in _outcomes(member._last())]
    return [step] if step.id else []


def _message_of(sig: Signature[Any]) -> Message:
    """The message a signature would be sent as, for failing it without sending it."""
    options = sig.options
    link_error = options.get("link_error")
    errbacks = [dict(link_error)] if isinstance(link_error, Mapping) else [dict(e) for e in link_error or ()]
    return Message(
        options.get("task_id") or "",
        sig.task,
        sig.args,
        sig.kwargs,
        chain=options.get("chain"),
        errbacks=errbacks or None,
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        chord=options.get("chord"),
        reply_to=options.get("reply_to"),
    )
