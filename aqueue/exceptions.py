"""Every error aqueue raises.

::

    AqueueError
    ├── ImproperlyConfigured          a setting, URL or option is wrong; the message says what to do
    │   ├── UnknownSetting            a setting name aqueue does not know (suggests the closest)
    │   ├── InvalidURL                a broker or backend URL it cannot use
    │   ├── InvalidRate               a rate string that is not N/s, N/m or N/h
    │   ├── InvalidSchedule           a crontab field, schedule or beat_schedule entry it cannot use
    │   ├── MissingExtra              a transport whose optional dependency is not installed
    │   └── NoResultBackend           a result was asked for but no result_backend is set
    ├── NotRegistered                 a task name no app or worker knows
    ├── SerializationError
    │   ├── EncodeError               an argument or result the serializer cannot encode
    │   ├── DecodeError               bytes that do not decode to a message
    │   └── ContentDisallowed         a content type outside accept_content
    ├── OperationalError              the broker or backend cannot be reached or failed
    │   └── DeliveryLost              a delivery's channel closed before its ack: it comes again
    ├── ResultNotStored               get() on a task published with ignore_result
    ├── TimeoutError                  get(timeout=...) ran out (also a builtin TimeoutError)
    ├── TaskError                     a task failed with an exception that cannot be rebuilt here
    ├── TaskRevokedError              get() on a task that was revoked or expired
    ├── ChordError                    a chord's header task failed, so its callback did not run
    └── TaskPredicate                 raised inside a task to steer the worker
        ├── Retry                     run the task again later
        ├── Ignore                    store nothing, ack the message
        └── Reject                    reject the message (dead-letter or requeue)
    MaxRetriesExceededError(AqueueError)   retry() past max_retries
    TimeLimitExceeded(AqueueError)         the task ran past its time_limit
    SoftTimeLimitExceeded(AqueueError)     the task ran past its soft_time_limit
"""

from __future__ import annotations

import builtins
import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = [
    "AqueueError",
    "ChordError",
    "ContentDisallowed",
    "DecodeError",
    "DeliveryLost",
    "EncodeError",
    "Ignore",
    "ImproperlyConfigured",
    "InvalidRate",
    "InvalidSchedule",
    "InvalidURL",
    "MaxRetriesExceededError",
    "MissingExtra",
    "NoResultBackend",
    "NotRegistered",
    "OperationalError",
    "Reject",
    "ResultNotStored",
    "Retry",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "TaskError",
    "TaskPredicate",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "UnknownSetting",
]


class AqueueError(Exception):
    """The root of every aqueue error."""


class ImproperlyConfigured(AqueueError):
    """A setting, URL or option cannot be used as given."""


class UnknownSetting(ImproperlyConfigured, AttributeError):
    """A setting name that aqueue does not know."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
        self.suggestion = close[0] if close else None
        hint = f" Did you mean {self.suggestion!r}?" if self.suggestion else ""
        super().__init__(f"Unknown setting {name!r}.{hint}")
        self.name = name  # after AttributeError.__init__, which resets ``name`` to None


class InvalidURL(ImproperlyConfigured, ValueError):
    """A broker or result backend URL that aqueue cannot use."""


class InvalidRate(ImproperlyConfigured, ValueError):
    """A rate limit string that is not of the form N/s, N/m or N/h."""

    def __init__(self, rate: object) -> None:
        self.rate = rate
        super().__init__(
            f"Invalid rate limit {rate!r}: use a number of tasks per second, minute or hour, "
            "such as '10/s', '100/m' or '1000/h'."
        )


class InvalidSchedule(ImproperlyConfigured, ValueError):
    """A crontab field, interval or ``beat_schedule`` entry that cannot be used (the message quotes it)."""


class MissingExtra(ImproperlyConfigured, ImportError):
    """A transport whose optional dependency is not installed."""

    def __init__(self, scheme: str, extra: str, module: str) -> None:
        self.scheme, self.extra = scheme, extra
        super().__init__(
            f"The {scheme}:// transport needs the {module!r} package, which is not installed. "
            f"Install it with: pip install 'aqueue[{extra}]'"
        )

    @classmethod
    @contextmanager
    def guard(cls, scheme: str, extra: str) -> Iterator[None]:
        """Turn the absence of ``extra``'s package, met while importing a transport, into this error."""
        package, shown = _EXTRA_PACKAGES[extra]
        try:
            yield
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in package:
                raise
            raise cls(scheme, extra, shown) from exc


_EXTRA_PACKAGES = {"redis": (("redis",), "redis"), "amqp": (("aio_pika", "aiormq"), "aio-pika")}
"""The top-level packages each extra installs (any one missing means the extra is), and its pip name."""


class NoResultBackend(ImproperlyConfigured):
    """A result was asked for, but the app has no result backend."""

    def __init__(self, task_id: str | None = None) -> None:
        self.task_id = task_id
        super().__init__(
            "No result backend is configured, so task results are not stored. Set the "
            "'result_backend' setting (for example App(..., backend='redis://localhost') or "
            "app.conf.result_backend = 'sqlite:///results.db')."
        )


class NotRegistered(AqueueError, KeyError):
    """A task name that is not registered."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"Task {self.name!r} is not registered."


class SerializationError(AqueueError):
    """Encoding or decoding failed."""


class EncodeError(SerializationError, TypeError):
    """A value the serializer cannot encode."""


class DecodeError(SerializationError, ValueError):
    """Bytes that do not decode to a message."""


class ContentDisallowed(SerializationError):
    """A content type that accept_content does not allow."""


class OperationalError(AqueueError, ConnectionError):
    """The broker or result backend cannot be reached, or failed an operation."""


class DeliveryLost(OperationalError):
    """A message could not be acknowledged: its connection closed, and the broker delivers it again."""


class ResultNotStored(AqueueError):
    """get() on a result that was never going to be stored."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"Task {task_id} was sent with ignore_result=True, so its result is not stored and "
            "cannot be fetched. Drop ignore_result (task option, apply_async or "
            "task_ignore_result) to get results."
        )


class TimeoutError(AqueueError, builtins.TimeoutError):
    """The operation timed out."""


class TaskError(AqueueError):
    """A task failed with an exception class that cannot be rebuilt in this process."""

    def __init__(self, exc_type: str, exc_module: str | None, message: str) -> None:
        self.exc_type, self.exc_module, self.message = exc_type, exc_module, message
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type

    def __repr__(self) -> str:
        return f"TaskError(exc_type={self.exc_type!r}, message={self.message!r})"


class TaskRevokedError(AqueueError):
    """The task was revoked (or expired) instead of run."""


class ChordError(AqueueError):
    """A task of a chord's header failed, so the chord's callback did not run (its stored state)."""


class TaskPredicate(AqueueError):
    """Raised inside a task to tell the worker what to do with it."""


class Retry(TaskPredicate):
    """Run the task again after ``when`` seconds (or at ``when`` if it is a datetime)."""

    def __init__(
        self, message: str | None = None, exc: BaseException | None = None, when: float | None = None
    ) -> None:
        self.message, self.exc, self.when = message, exc, when
        super().__init__(message or "Retry")

    def __str__(self) -> str:
        why = f": {self.exc!r}" if self.exc else ""
        when = f" in {self.when}s" if self.when is not None else ""
        return f"Retry{when}{why}"

    def __repr__(self) -> str:
        return f"Retry(when={self.when!r}, exc={self.exc!r})"


class Ignore(TaskPredicate):
    """Do not store a state for this task; acknowledge the message."""


class Reject(TaskPredicate):
    """Reject the message: requeue it when ``requeue`` is true, else dead-letter it."""

    def __init__(self, reason: object = None, requeue: bool = False) -> None:
        self.reason, self.requeue = reason, requeue
        super().__init__(reason)

    def __repr__(self) -> str:
        return f"Reject(reason={self.reason!r}, requeue={self.requeue!r})"


class MaxRetriesExceededError(AqueueError):
    """retry() was called more than max_retries times."""


class TimeLimitExceeded(AqueueError):
    """The task ran past its hard time limit and was cancelled."""


class SoftTimeLimitExceeded(AqueueError):
    """The task ran past its soft time limit."""
