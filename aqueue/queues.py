"""Which arguments each queue is declared with: Celery's queue settings, read once.

A broker that declares queues (RabbitMQ) declares each exactly as a Celery app with the same settings
would, so that either side's declaration of a queue the other created agrees (RabbitMQ refuses a second
declaration with other arguments). The settings, with Celery's names and meanings:

- ``task_queues``: queues with arguments of their own, as kombu ``Queue`` objects (``Queue('fast',
  queue_arguments={'x-queue-type': 'quorum'})``) or as Celery's mapping form, queue name to options
  (``{'fast': {'queue_arguments': {'x-queue-type': 'quorum'}}}``); ``queue_arguments``, ``max_priority``,
  ``expires``, ``message_ttl``, ``max_length`` and ``max_length_bytes`` are read, as kombu turns them
  into ``x-`` arguments;
- ``task_default_queue_type``: ``'classic'`` or ``'quorum'``, for ``task_default_queue`` when
  ``task_queues`` is empty;
- ``task_create_missing_queue_type``: the same, for every other queue (named by routing or ``-Q``);
- ``task_queue_max_priority``: ``x-max-priority`` of every queue that sets none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aqueue.exceptions import ImproperlyConfigured

__all__ = ["QUEUE_TYPES", "QueueDeclarations", "is_quorum"]

QUEUE_TYPES = ("classic", "quorum")

_KOMBU_ARGUMENTS = (
    ("max_priority", "x-max-priority", 1),
    ("expires", "x-expires", 1000),
    ("message_ttl", "x-message-ttl", 1000),
    ("max_length", "x-max-length", 1),
    ("max_length_bytes", "x-max-length-bytes", 1),
)
"""kombu's Queue attributes that become queue arguments: the attribute, the argument, the factor to it."""


@dataclass(frozen=True, slots=True)
class QueueDeclarations:
    """The declaration arguments of every queue, from Celery's settings (see the module docstring)."""

    default_queue: str = "celery"
    default_type: str = "classic"
    missing_type: str = "classic"
    max_priority: int | None = None
    queues: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Queues named by ``task_queues``, with their own arguments."""

    @classmethod
    def of(
        cls,
        task_queues: Any = None,
        *,
        default_queue: str = "celery",
        default_type: str = "classic",
        missing_type: str = "classic",
        max_priority: int | None = None,
    ) -> QueueDeclarations:
        """Read ``task_queues`` (kombu Queues or Celery's mapping form) and the other settings.

        Raises:
            ImproperlyConfigured: an entry of ``task_queues`` that is neither.
        """
        for name, value in (
            ("task_default_queue_type", default_type),
            ("task_create_missing_queue_type", missing_type),
        ):
            if value not in QUEUE_TYPES:
                raise ImproperlyConfigured(f"{name} must be 'classic' or 'quorum', not {value!r}.")
        queues = {name: _arguments(name, options) for name, options in _entries(task_queues)}
        return cls(default_queue, default_type, missing_type, max_priority, queues)

    def arguments(self, queue: str) -> dict[str, Any]:
        """The arguments ``queue`` is declared with (an empty dict: a plain durable queue)."""
        if queue in self.queues:
            arguments = dict(self.queues[queue])
        else:
            kind = self.default_type if queue == self.default_queue and not self.queues else self.missing_type
            arguments = {"x-queue-type": "quorum"} if kind == "quorum" else {}
        if self.max_priority is not None:
            arguments.setdefault("x-max-priority", self.max_priority)
        return arguments


def is_quorum(arguments: Mapping[str, Any] | None) -> bool:
    """Whether a queue declared with ``arguments`` is a quorum queue."""
    return bool(arguments) and arguments.get("x-queue-type") == "quorum"  # type: ignore[union-attr]


def _entries(task_queues: Any) -> list[tuple[str, Any]]:
    if not task_queues:
        return []
    if isinstance(task_queues, Mapping):
        return [(str(name), options) for name, options in task_queues.items()]
    entries = []
    for queue in task_queues:
        name = getattr(queue, "name", None)
        if not isinstance(name, str) or not name:
            raise ImproperlyConfigured(
                f"task_queues holds {queue!r}: use kombu.Queue('name', queue_arguments={{...}}) objects, "
                "or a mapping of queue name to options ({'name': {'queue_arguments': {...}}})."
            )
        entries.append((name, queue))
    return entries


def _arguments(name: str, options: Any) -> dict[str, Any]:
    """The x- arguments of one ``task_queues`` entry, as kombu prepares them for RabbitMQ."""

    def read(attribute: str) -> Any:
        if isinstance(options, Mapping):
            return options.get(attribute)
        return getattr(options, attribute, None)

    given = read("queue_arguments") or {}
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured(
            f"task_queues[{name!r}]: queue_arguments must be a mapping, not {given!r}."
        )
    arguments = dict(given)
    for attribute, argument, factor in _KOMBU_ARGUMENTS:
        value = read(attribute)
        if value is not None:
            arguments[argument] = int(float(value) * factor)
    kind = arguments.get("x-queue-type", "classic")
    if kind not in QUEUE_TYPES:
        raise ImproperlyConfigured(
            f"task_queues[{name!r}]: x-queue-type must be 'classic' or 'quorum', not {kind!r}."
        )
    return arguments
