"""Beat: sends the entries of ``beat_schedule`` when they are due; any number of beats may share a broker.

An entry's due times come from its schedule (:mod:`aqueue.schedules`) and are the same in every process.
For each due time, a beat raises the entry's mark on the broker (:meth:`~aqueue.broker.base.Broker.advance`,
key ``beat.<entry name>``) to it, and sends the task only when that call moved the mark: of several beats,
exactly one sends each due time. The mark is also what a restarted beat finds:

- an entry's first start (no mark yet): the mark is set to the latest due time passed and nothing is
  sent; the entry first runs at its next due time, as on Celery's first start;
- after downtime: the latest due time missed is sent once, at start, and the earlier missed ones are
  not (Celery also sends one catch-up run). ``beat_cron_starting_deadline`` (seconds) drops that run
  for a crontab entry when it is older than that, as in Celery;
- a due time sent before (by this beat before a restart, or by another beat) is not sent again.

An entry is sent as a signature (:mod:`aqueue.canvas`) through the one send path, so its ``options``
(``queue``, ``priority``, ``expires``, ``countdown``, ``link``...) act as they do on ``apply_async``, and
``add_periodic_task`` takes any signature: a chain, a group or a chord too (the entry then carries its
``subtask_type``, and ``immutable`` when it is set).

The mark is raised before the task is sent, so a beat that dies between the two loses that run instead
of letting another beat send it a second time: at most once per due time. The task id is derived from
the entry name and the due time (a uuid5), the same in every process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from aqueue.broker import Broker
from aqueue.broker import from_url as broker_from_url
from aqueue.canvas import Signature, apply_signature, signature
from aqueue.exceptions import ImproperlyConfigured, InvalidSchedule, OperationalError
from aqueue.options import INERT_CALL_OPTIONS, SendOptions
from aqueue.schedules import BaseSchedule, crontab, maybe_schedule

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["Beat", "Entry", "add_periodic_task", "parse_schedule"]

logger = logging.getLogger("aqueue.beat")

_KEYS = ("task", "schedule", "args", "kwargs", "options", "relative", "immutable", "subtask_type")
"""What an entry may hold; ``relative`` is Celery's and changes nothing (intervals are always aligned);
``immutable`` and ``subtask_type`` are a signature's, which ``add_periodic_task`` keeps."""
_KINDS = ("chain", "chord", "chunks", "group", "xmap", "xstarmap")
"""The ``subtask_type`` of a workflow signature (:mod:`aqueue.canvas`)."""
_SEND_OPTIONS = frozenset(SendOptions.__annotations__)
"""The options an entry may give: those of ``send_task``, Celery's transport-only ones included."""
_OWN_OPTIONS = sorted(_SEND_OPTIONS - INERT_CALL_OPTIONS)
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "aqueue.beat")
_RETRY = (0.5, 10.0)
"""Seconds before trying a broker that failed again: the first wait, doubling up to the second."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One periodic task: what to send (``task``, ``args``, ``kwargs``, ``options``) and when."""

    name: str
    task: str
    schedule: BaseSchedule
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    immutable: bool = False
    subtask_type: str | None = None

    def signature(self, app: App) -> Signature[Any]:
        """What to send, a new copy each time (sending a workflow fixes its ids in it)."""
        return signature(
            {
                "task": self.task,
                "args": self.args,
                "kwargs": self.kwargs,
                "options": self.options,
                "immutable": self.immutable,
                "subtask_type": self.subtask_type,
            },
            app=app,
        )

    def task_id(self, due: float) -> str:
        """The id of the run due at ``due``: the same in every beat."""
        return str(uuid.uuid5(_NAMESPACE, f"{self.name}@{due!r}"))


def parse_schedule(table: Any) -> list[Entry]:
    """The entries of a ``beat_schedule`` setting.

    Raises:
        InvalidSchedule: an entry that cannot be used; the message names it and says what it takes.
    """
    if not isinstance(table, Mapping):
        raise InvalidSchedule(
            f"beat_schedule must be a dict of entry names to {{'task': ..., 'schedule': ...}}, not {table!r}."
        )
    return [_entry(str(name), raw) for name, raw in table.items()]


def _entry(name: str, raw: Any) -> Entry:
    where = f"beat_schedule entry {name!r}"
    if not isinstance(raw, Mapping):
        raise InvalidSchedule(f"{where} must be a dict with 'task' and 'schedule', not {raw!r}.")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise InvalidSchedule(f"{where} has an unknown key {unknown[0]!r}: it takes {', '.join(_KEYS)}.")
    task = raw.get("task")
    if not isinstance(task, str) or not task:
        raise InvalidSchedule(f"{where} needs 'task': the name of the task to send, such as 'tasks.add'.")
    if "schedule" not in raw:
        raise InvalidSchedule(
            f"{where} needs 'schedule': seconds, a timedelta, schedule(...) or crontab(...)."
        )
    try:
        when = maybe_schedule(raw["schedule"])
    except InvalidSchedule as exc:
        raise InvalidSchedule(f"{where}: {exc}") from None
    args, kwargs, options = raw.get("args") or (), raw.get("kwargs") or {}, raw.get("options") or {}
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise InvalidSchedule(f"{where}: 'args' must be a list or tuple, not {args!r}.")
    if not isinstance(kwargs, Mapping) or not isinstance(options, Mapping):
        raise InvalidSchedule(f"{where}: 'kwargs' and 'options' must be dicts.")
    if bad := sorted(set(options) - _SEND_OPTIONS):
        raise InvalidSchedule(f"{where}: unknown option {bad[0]!r}; options are {', '.join(_OWN_OPTIONS)}.")
    subtask_type = raw.get("subtask_type")
    if subtask_type is not None and subtask_type not in _KINDS:
        raise InvalidSchedule(f"{where}: 'subtask_type' is one of {', '.join(_KINDS)}, not {subtask_type!r}.")
    return Entry(
        name,
        task,
        when,
        tuple(args),
        dict(kwargs),
        dict(options),
        immutable=bool(raw.get("immutable")),
        subtask_type=subtask_type,
    )


def add_periodic_task(
    app: App,
    schedule: Any,
    sig: Any,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """:meth:`App.add_periodic_task`: add an entry to ``beat_schedule``; returns its name.

    ``sig`` is a signature (a mapping with ``task``, ``args``, ``kwargs``, ``options``, as Celery's
    signature dicts), a task, or a task name. ``args`` go before the signature's own, ``kwargs`` and
    ``options`` over its own, as Celery's ``clone``. Without ``name`` the entry is named like the call,
    ``tasks.add(2, 2)``.
    """
    task, sig_args, sig_kwargs, sig_options, kind = _signature(sig)
    immutable = bool(kind.get("immutable"))
    if args and not immutable:
        sig_args = (*args, *sig_args)
    if kwargs and not immutable:
        sig_kwargs = {**sig_kwargs, **kwargs}
    entry = {
        "task": task,
        "schedule": schedule,
        "args": sig_args,
        "kwargs": sig_kwargs,
        "options": {**sig_options, **(options or {})},
        **kind,
    }
    key = name or _call_repr(task, sig_args, sig_kwargs)
    _entry(key, entry)
    if name is None and key in app.conf.beat_schedule:
        logger.warning(
            "Periodic task key=%r shadowed a previous unnamed periodic task. "
            "Pass a name kwarg to add_periodic_task to silence this warning.",
            key,
        )
    app.conf.beat_schedule[key] = entry
    return key


def _signature(sig: Any) -> tuple[str, tuple[Any, ...], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A signature's task, args, kwargs, options, and its ``immutable`` and ``subtask_type`` when set."""
    if isinstance(sig, str):
        return sig, (), {}, {}, {}
    if isinstance(sig, Mapping) and isinstance(sig.get("task"), str):
        args, kwargs, options = sig.get("args") or (), sig.get("kwargs") or {}, sig.get("options") or {}
        kind = {key: sig[key] for key in ("immutable", "subtask_type") if sig.get(key)}
        return sig["task"], tuple(args), dict(kwargs), dict(options), kind
    if isinstance(getattr(sig, "name", None), str):
        return sig.name, (), {}, {}, {}
    raise InvalidSchedule(
        f"add_periodic_task() takes a signature (add.s(2, 2)), a task or a task name, not {sig!r}."
    )


def _call_repr(task: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{task}({', '.join(shown)})"


@dataclass(slots=True)
class _Slot:
    entry: Entry
    seen: float = -math.inf
    """The latest due time whose mark this beat raised or found raised."""
    next: float = -math.inf
    """When to look at the entry again."""


class Beat:
    """Sends ``app``'s periodic tasks when they are due: ``await beat.run()`` until ``request_stop()``,
    or ``async with Beat(app):`` to run it in the background (as ``worker -B`` does).

    Parameters:
        app: the app; its ``beat_schedule`` (with what ``on_after_configure`` receivers add) is read at start.
        max_interval: the longest sleep between two looks at the schedule (default
            ``beat_max_loop_interval``, 300 s).
    """

    def __init__(self, app: App, *, max_interval: float | None = None) -> None:
        self.app = app
        self.max_interval = app.conf.beat_max_loop_interval if max_interval is None else max_interval
        self.slots: list[_Slot] = []
        self.marks: Broker | None = None
        """A broker of its own keeps the marks, so what it owns (on RabbitMQ) goes when the beat stops."""
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._retry = _RETRY[0]

    async def start(self) -> None:
        """Import the app's modules, send its configure signals, and read the schedule.

        Raises:
            InvalidSchedule: an entry of ``beat_schedule`` cannot be used.
            ImproperlyConfigured: the broker has nowhere to keep marks.
        """
        app, conf = self.app, self.app.conf
        app.import_modules()
        app.finalize()
        self.zone, self.deadline = conf.app_timezone(), conf.beat_cron_starting_deadline
        self.slots = [_Slot(entry) for entry in parse_schedule(conf.beat_schedule)]
        marks = broker_from_url(app.broker_url, conf.broker_transport_options)
        if type(marks).advance is Broker.advance:
            raise ImproperlyConfigured(f"The broker {marks} has nowhere to keep beat's marks.")
        self.marks = marks
        logger.info("beat: Starting...")

    async def stop(self) -> None:
        """Close the marks' connection (on RabbitMQ, this hands the marks this beat owned to another)."""
        marks, self.marks = self.marks, None
        if marks is not None:
            await marks.aclose()

    async def run(self) -> None:
        """Start, then send what is due until :meth:`request_stop`, then stop."""
        await self.start()
        try:
            await self._loop()
        finally:
            await asyncio.shield(self.stop())

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            wake = await self.tick()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(wake - time.time(), self.max_interval))

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        self._stopping.set()

    async def tick(self, now: float | None = None) -> float:
        """Send the entries due at ``now`` (default: the current time); returns when to look again.

        Raises:
            RuntimeError: the beat was not started.
        """
        if self.marks is None:
            raise RuntimeError("Beat.tick() before Beat.start()")
        now = time.time() if now is None else now
        looked = [slot for slot in self.slots if slot.next <= now]
        claims = await asyncio.gather(*(self._claim(slot, now) for slot in looked), return_exceptions=True)
        failed = [
            slot for slot, claim in zip(looked, claims, strict=True) if isinstance(claim, OperationalError)
        ]
        self._back_off(failed, now)
        for claim in claims:
            if isinstance(claim, BaseException) and not isinstance(claim, OperationalError):
                raise claim
        due = [
            (slot.entry, claim)
            for slot, claim in zip(looked, claims, strict=True)
            if isinstance(claim, float)
        ]
        await asyncio.gather(*(self._send(entry, when) for entry, when in due))
        return min((slot.next for slot in self.slots), default=now + self.max_interval)

    async def _claim(self, slot: _Slot, now: float) -> float | None:
        """The due time to send for ``slot``, if any.

        Raises:
            OperationalError: the broker failed (logged here).
        """
        assert self.marks is not None
        when, entry = slot.entry.schedule, slot.entry
        due = when.last_due(now, self.zone)
        if due <= slot.seen:
            slot.next = when.next_due(now, self.zone)
            return None
        try:
            previous = await self.marks.advance(f"beat.{entry.name}", due)
        except OperationalError as exc:
            logger.warning("beat: cannot keep the mark of %s on %s: %s", entry.name, self.marks, exc)
            raise
        slot.seen, slot.next = due, when.next_due(due, self.zone)
        if previous is None:
            logger.debug("beat: %s starts; its first run is due at %s", entry.name, _shown(slot.next))
        elif previous >= due:
            logger.debug("beat: %s due at %s was sent by another beat", entry.name, _shown(due))
        elif self._too_late(entry, due, now):
            logger.info("beat: %s due at %s is past beat_cron_starting_deadline", entry.name, _shown(due))
        else:
            return due
        return None

    def _too_late(self, entry: Entry, due: float, now: float) -> bool:
        return isinstance(entry.schedule, crontab) and self.deadline is not None and now - due > self.deadline

    def _back_off(self, failed: list[_Slot], now: float) -> None:
        if not failed:
            self._retry = _RETRY[0]
            return
        for slot in failed:
            slot.next = now + self._retry
        self._retry = min(self._retry * 2, _RETRY[1])

    async def _send(self, entry: Entry, due: float) -> None:
        logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            await apply_signature(entry.signature(self.app), (), {}, {"task_id": entry.task_id(due)})
        except Exception as exc:
            logger.error("Message Error: Couldn't apply scheduled task %s: %s", entry.name, exc)

    async def __aenter__(self) -> Self:
        await self.start()
        self._runner = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.request_stop()
        try:
            if self._runner is not None:
                await self._runner
        finally:
            await self.stop()


def _shown(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))
