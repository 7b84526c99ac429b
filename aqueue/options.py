"""Task options and where each comes from: one rule for every option, resolved once per task.

The rule: **the call > the task > ``task_annotations`` > the setting > the built-in default.**

- *The call*: ``apply_async(...)``/``send_task(...)`` keywords, for the options a call can carry
  (queue, serializer, ignore_result, priority, expires, time_limit, soft_time_limit). As in Celery,
  ``None`` at the call means "not given".
- *The task*: ``@app.task(...)`` keywords, kept in :class:`TaskOptions`. Here ``None`` is a value
  (``max_retries=None`` retries for ever, ``rate_limit=None`` has no limit); an option not given is
  :data:`NOT_GIVEN`.
- *Annotations*: the ``task_annotations`` entry of the task's name, then of ``'*'``. (Celery applies an
  annotation over the decorator's value; aqueue keeps what the code says first, so a task's own option is
  never silently replaced by configuration.)
- *The setting*, for the options that have one (``task_acks_late`` for ``acks_late``, ...), else the
  default of the table below.

:func:`resolve` turns the three layers into a :class:`ResolvedOptions` with a value for every option.
The app caches one per task name until a setting changes; the client, the worker and ``Task.retry`` all
read that one object.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypedDict

from aqueue.exceptions import ImproperlyConfigured
from aqueue.rates import parse_rate

if TYPE_CHECKING:
    from aqueue.config import Settings
    from aqueue.message import Message

__all__ = [
    "INERT_CALL_OPTIONS",
    "OPTION_NAMES",
    "CeleryOnlyOptions",
    "NOT_GIVEN",
    "NotGiven",
    "ResolvedOptions",
    "SendOptions",
    "TaskOptionArgs",
    "TaskOptions",
    "apply_call_options",
    "resolve",
]


class NotGiven:
    """The type of :data:`NOT_GIVEN`: an option that was not set at this level."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False


NOT_GIVEN: Final = NotGiven()
"""An option not given at this level: the next level decides."""


class TaskOptionArgs(TypedDict, total=False):
    """The keyword options ``@app.task(...)`` takes (see :class:`TaskOptions`)."""

    ignore_result: bool
    rate_limit: str | float | None
    global_rate_limit: str | float | None
    acks_late: bool
    acks_on_failure_or_timeout: bool
    queue: str | None
    serializer: str
    max_retries: int | None
    default_retry_delay: float
    time_limit: float | None
    soft_time_limit: float | None
    track_started: bool
    priority: int | None
    expires: float | None
    autoretry_for: tuple[type[BaseException], ...]
    retry_kwargs: dict[str, Any]
    retry_backoff: bool | float
    retry_backoff_max: float
    retry_jitter: bool


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options set on the task by ``@app.task(...)``; :data:`NOT_GIVEN` falls back to the next level."""

    ignore_result: bool | NotGiven = NOT_GIVEN
    rate_limit: str | float | NotGiven | None = NOT_GIVEN
    global_rate_limit: str | float | NotGiven | None = NOT_GIVEN
    acks_late: bool | NotGiven = NOT_GIVEN
    acks_on_failure_or_timeout: bool | NotGiven = NOT_GIVEN
    queue: str | NotGiven | None = NOT_GIVEN
    serializer: str | NotGiven = NOT_GIVEN
    max_retries: int | NotGiven | None = NOT_GIVEN
    default_retry_delay: float | NotGiven = NOT_GIVEN
    time_limit: float | NotGiven | None = NOT_GIVEN
    soft_time_limit: float | NotGiven | None = NOT_GIVEN
    track_started: bool | NotGiven = NOT_GIVEN
    priority: int | NotGiven | None = NOT_GIVEN
    expires: float | NotGiven | None = NOT_GIVEN
    autoretry_for: tuple[type[BaseException], ...] | NotGiven = NOT_GIVEN
    retry_kwargs: dict[str, Any] | NotGiven = NOT_GIVEN
    retry_backoff: bool | float | NotGiven = NOT_GIVEN
    retry_backoff_max: float | NotGiven = NOT_GIVEN
    retry_jitter: bool | NotGiven = NOT_GIVEN

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> TaskOptions:
        """The options given to ``@app.task``, checked.

        Raises:
            ImproperlyConfigured: an unknown option (the known ones are listed) or a bad rate limit.
        """
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            known = ", ".join(cls.__dataclass_fields__)
            raise ImproperlyConfigured(f"Unknown task option(s) {', '.join(unknown)}: use {known}")
        made = cls(**options)
        for name in ("rate_limit", "global_rate_limit"):
            value = getattr(made, name)
            if not isinstance(value, NotGiven):
                parse_rate(value)
        return made


@dataclass(frozen=True, slots=True)
class ResolvedOptions:
    """A task's options after :func:`resolve`: a value for each, no :data:`NOT_GIVEN` left."""

    ignore_result: bool
    rate_limit: str | float | None
    global_rate_limit: str | float | None
    acks_late: bool
    acks_on_failure_or_timeout: bool
    queue: str | None
    """The task's own queue (task, then annotation); ``task_routes`` and the call still come first."""
    serializer: str
    max_retries: int | None
    default_retry_delay: float
    time_limit: float | None
    soft_time_limit: float | None
    track_started: bool
    priority: int | None
    expires: float | None
    autoretry_for: tuple[type[BaseException], ...]
    retry_kwargs: dict[str, Any]
    retry_backoff: bool | float
    retry_backoff_max: float
    retry_jitter: bool


_SETTINGS: Final[dict[str, str]] = {
    "ignore_result": "task_ignore_result",
    "rate_limit": "task_default_rate_limit",
    "global_rate_limit": "task_default_global_rate_limit",
    "acks_late": "task_acks_late",
    "acks_on_failure_or_timeout": "task_acks_on_failure_or_timeout",
    "serializer": "task_serializer",
    "default_retry_delay": "task_default_retry_delay",
    "time_limit": "task_time_limit",
    "soft_time_limit": "task_soft_time_limit",
    "track_started": "task_track_started",
    "priority": "task_default_priority",
}
"""The setting each option falls back to."""

_DEFAULTS: Final[dict[str, Any]] = {
    "queue": None,
    "max_retries": 3,
    "expires": None,
    "autoretry_for": (),
    "retry_kwargs": {},
    "retry_backoff": False,
    "retry_backoff_max": 600.0,
    "retry_jitter": True,
}
"""Celery's defaults for the options that have no setting."""

OPTION_NAMES: Final = tuple(f.name for f in fields(ResolvedOptions))


def resolve(own: TaskOptions, annotation: Mapping[str, Any], conf: Settings) -> ResolvedOptions:
    """Every option of one task: its own value, else its annotation's, else the setting's (or default)."""
    values: dict[str, Any] = {}
    for name in OPTION_NAMES:
        value = getattr(own, name)
        if isinstance(value, NotGiven):
            if name in annotation:
                value = annotation[name]
            elif name in _SETTINGS:
                value = getattr(conf, _SETTINGS[name])
            else:
                value = _DEFAULTS[name]
        values[name] = value
    for name in ("rate_limit", "global_rate_limit"):
        parse_rate(values[name])  # an annotation's rate is checked like the task's
    return ResolvedOptions(**values)


class CeleryOnlyOptions(TypedDict, total=False):
    """Celery ``apply_async`` options that have no effect here: publishing is always retried per
    ``task_publish_retry_policy``, routing is by queue name, and messages are always persistent."""

    add_to_parent: Any
    compression: Any
    connection: Any
    declare: Any
    delivery_mode: Any
    exchange: Any
    exchange_type: Any
    immediate: Any
    mandatory: Any
    producer: Any
    publisher: Any
    retry: Any
    retry_policy: Any
    routing_key: Any
    shadow: Any
    argsrepr: Any
    kwargsrepr: Any
    stamped_headers: Any
    replaced_task_nesting: Any


class SendOptions(CeleryOnlyOptions, total=False):
    """The options of ``apply_async`` and ``send_task``; ``None`` means "not given", as in Celery."""

    task_id: str | None
    queue: str | None
    """Overrides task_routes and the task's own queue."""
    countdown: float | None
    """Seconds from now before the task may start."""
    eta: datetime | float | str | None
    """When the task may start: a datetime (naive: in the app's zone), an ISO 8601 string or a unix time."""
    expires: datetime | float | str | None
    """Seconds from now, a datetime or an ISO 8601 string, after which the task is revoked instead of run."""
    headers: dict[str, Any] | None
    ignore_result: bool | None
    serializer: str | None
    priority: int | None
    time_limit: float | None
    soft_time_limit: float | None
    link: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
    """Signature(s) sent with the result as first argument when the task succeeds."""
    link_error: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
    """Signature(s) called when the task fails: ``err(request, exc, traceback)``."""
    reply_to: str | None
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    group_index: int | None
    chain: list[dict[str, Any]] | None
    chord: dict[str, Any] | None
    retries: int | None


INERT_CALL_OPTIONS: Final = frozenset(CeleryOnlyOptions.__annotations__)
"""Celery ``apply_async`` options accepted so Celery code runs as is, with no effect here."""

_CALL_OPTIONS: Final = frozenset(SendOptions.__annotations__) | INERT_CALL_OPTIONS


def apply_call_options(
    message: Message, options: Mapping[str, Any], conf: Settings
) -> tuple[str | None, str | None]:
    """Put the call's options on ``message``; returns the call's (serializer, queue), ``None`` if not given.

    Raises:
        ImproperlyConfigured: an unknown option (the closest is named) or a value of the wrong kind.
    """
    unknown = options.keys() - _CALL_OPTIONS
    if unknown:
        raise _unknown_call_option(min(unknown))
    get = options.get
    message.eta = _eta(get("eta"), get("countdown"), conf)
    expires = get("expires")
    if expires is not None:
        message.expires = _moment(expires, conf, "expires", relative=True)
    for name, attribute in _PLAIN:
        value = get(name)
        if value is not None:
            setattr(message, attribute, value)
    for name, attribute in (("link", "callbacks"), ("link_error", "errbacks")):
        value = get(name)
        if value:
            setattr(message, attribute, _signature_list(value, name))
    if message.priority is not None and not (
        isinstance(message.priority, int) and 0 <= message.priority <= 255
    ):
        raise ImproperlyConfigured(f"priority must be an integer from 0 to 255, not {message.priority!r}")
    return get("serializer"), get("queue")


_PLAIN: Final = (
    ("headers", "headers"), ("ignore_result", "ignore_result"), ("priority", "priority"),
    ("time_limit", "time_limit"), ("soft_time_limit", "soft_time_limit"), ("reply_to", "reply_to"),
    ("root_id", "root_id"), ("parent_id", "parent_id"), ("group_id", "group"), ("group_index", "group_index"),
    ("chain", "chain"), ("chord", "chord"), ("retries", "retries"),
)  # fmt: skip
"""Call options copied onto the message as they are: (option, message attribute)."""


def _eta(eta: Any, countdown: Any, conf: Settings) -> float | None:
    if eta is not None:
        return _moment(eta, conf, "eta", relative=False)
    if countdown:
        if not isinstance(countdown, int | float) or isinstance(countdown, bool):
            raise ImproperlyConfigured(f"countdown must be a number of seconds, not {countdown!r}")
        return time.time() + countdown
    return None


def _moment(value: Any, conf: Settings, name: str, *, relative: bool) -> float:
    """Unix time of ``value``: a datetime (naive: in the app's zone), an ISO 8601 string, or a number
    (seconds from now when ``relative``, else a unix time)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ImproperlyConfigured(f"{name} must be an ISO 8601 date and time, not {value!r}") from None
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=conf.zone())).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return time.time() + value if relative else float(value)
    raise ImproperlyConfigured(f"{name} must be a datetime, an ISO 8601 string or a number, not {value!r}")


def _signature_list(value: Any, name: str) -> list[dict[str, Any]]:
    items = [value] if isinstance(value, Mapping) else list(value)
    for item in items:
        if not (isinstance(item, Mapping) and isinstance(item.get("task"), str)):
            raise ImproperlyConfigured(
                f"{name} takes a signature (task.s(...)) or a list of them, not {item!r}"
            )
    return [dict(item) for item in items]


def _unknown_call_option(name: str) -> ImproperlyConfigured:
    close = difflib.get_close_matches(name, sorted(_CALL_OPTIONS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ImproperlyConfigured(f"Unknown apply_async option {name!r}.{hint}")
