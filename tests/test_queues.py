"""Queue declarations: the arguments Celery would declare each queue with, from the same settings."""

from __future__ import annotations

from typing import Any

import kombu.entity
import pytest

from aqueue import App
from aqueue.exceptions import ImproperlyConfigured
from aqueue.queues import QueueDeclarations

QUORUM = {"x-queue-type": "quorum"}


def Queue(name: str, *args: Any, **options: Any) -> Any:
    """kombu's Queue, as a Celery configuration module builds it."""
    return kombu.entity.Queue(name, *args, **options)  # type: ignore[no-untyped-call]


def Exchange(name: str) -> Any:
    return kombu.entity.Exchange(name)  # type: ignore[no-untyped-call]


def celerys(**settings: Any) -> dict[str, dict[str, Any]]:
    """What Celery itself declares, per queue, for these settings (its own app.amqp.queues, prepared for
    RabbitMQ as kombu's pyamqp transport prepares them)."""
    from celery import Celery
    from kombu.transport.base import to_rabbitmq_queue_arguments

    app = Celery("tasks", broker="amqp://", set_as_current=False)
    app.conf.update(settings)
    queues = app.amqp.queues
    queues["routed-elsewhere"]  # a queue named by routing, which Celery creates as a missing one
    return {
        name: dict(
            to_rabbitmq_queue_arguments(
                queue.queue_arguments or {},
                expires=queue.expires,
                message_ttl=queue.message_ttl,
                max_length=queue.max_length,
                max_length_bytes=queue.max_length_bytes,
                max_priority=queue.max_priority,
            )
        )
        for name, queue in queues.items()
    }


def ours(**settings: Any) -> dict[str, dict[str, Any]]:
    app = App("tasks", broker="amqp://")
    app.conf.update(settings)
    declarations = QueueDeclarations.of(
        app.conf.task_queues,
        default_queue=app.conf.task_default_queue,
        default_type=app.conf.task_default_queue_type,
        missing_type=app.conf.task_create_missing_queue_type,
        max_priority=app.conf.task_queue_max_priority,
    )
    names = [*(declarations.queues or [app.conf.task_default_queue]), "routed-elsewhere"]
    return {name: declarations.arguments(name) for name in names}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"task_default_queue": "jobs"},
        {"task_default_queue_type": "quorum"},
        {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"},
        {"task_queue_max_priority": 10},
        {"task_queues": [Queue("fast", Exchange("fast"), "fast", queue_arguments=QUORUM), Queue("slow")]},
        {"task_queues": [Queue("prio", max_priority=5, message_ttl=60, expires=3600.5)]},
        {"task_queues": {"fast": {"queue_arguments": QUORUM}, "plain": {}}},
        {"task_queues": [Queue("fast", queue_arguments=QUORUM)], "task_queue_max_priority": 3},
    ],
    ids=[
        "default",
        "renamed-default",
        "quorum-default",
        "quorum-everywhere",
        "max-priority",
        "kombu-queues",
        "kombu-attributes",
        "mapping-form",
        "queues-and-priority",
    ],
)
def test_each_queue_is_declared_with_celerys_arguments(settings: dict[str, Any]) -> None:
    assert ours(**settings) == celerys(**settings)


def test_an_entry_that_is_not_a_queue_is_refused_at_the_setting() -> None:
    with pytest.raises(ImproperlyConfigured, match="task_queues holds 'fast'"):
        App("tasks", task_queues=["fast"])


def test_a_bad_queue_type_is_refused_at_the_setting() -> None:
    with pytest.raises(ImproperlyConfigured, match="task_default_queue_type"):
        App("tasks", task_default_queue_type="stream")
    with pytest.raises(ImproperlyConfigured, match="x-queue-type must be 'classic' or 'quorum'"):
        App("tasks", task_queues={"s": {"queue_arguments": {"x-queue-type": "stream"}}})
