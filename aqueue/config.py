"""Settings: Celery's names and defaults, validated; unknown names suggest the closest known one."""

from __future__ import annotations

import importlib
import logging
import os
import types
import zoneinfo
from collections.abc import Callable, Container, Iterator, Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from aqueue.exceptions import ImproperlyConfigured, UnknownSetting
from aqueue.rates import parse_rate
from aqueue.serialization import accepted_content_types, get_serializer

__all__ = ["DEFAULT_BROKER_URL", "INERT", "Settings"]

DEFAULT_BROKER_URL = "sqlite:///aqueue.db"
"""The embedded store used when no broker is configured anywhere: a file in the working directory."""

logger = logging.getLogger("aqueue")

INERT = {
    "broker_connection_retry": "brokers always reconnect with backoff after a lost connection",
    "broker_connection_timeout": "connection timeouts are broker_transport_options of each transport",
    "broker_pool_limit": "on Redis, use broker_transport_options={'max_connections': N}",
    "result_accept_content": "results are decoded with result_serializer",
    "result_extended": "results are stored in Celery's default layout, without the task's name and arguments",
    "task_reject_on_worker_lost": "with acks_late, the tasks of a worker process that dies are always redelivered",
    "task_create_missing_queues": "queues are always created when first used",
    "worker_hijack_root_logger": "the worker command always sets up the root logger",
    "beat_scheduler": "beat keeps its state on the broker; other schedulers are not supported",
    "beat_schedule_filename": "beat keeps its state on the broker, not in a file",
    "beat_sync_every": "beat writes its state to the broker at every run",
}
"""Celery settings aqueue accepts, so Celery configuration modules load unchanged, and why they do nothing."""

_ENVIRONMENT = {"broker_url": "AQUEUE_BROKER_URL", "result_backend": "AQUEUE_RESULT_BACKEND"}


class Settings(BaseModel):
    """The app's configuration, under Celery's setting names."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    # Broker
    broker_url: str | None = None
    broker_transport_options: dict[str, Any] = {}
    broker_connection_retry: bool = True
    broker_connection_retry_on_startup: bool = True
    broker_connection_max_retries: int | None = 100
    broker_connection_timeout: float = 4.0
    broker_pool_limit: int | None = 10
    # Results
    result_backend: str | None = None
    result_backend_transport_options: dict[str, Any] = {}
    result_serializer: str = "json"
    result_accept_content: list[str] | None = None
    result_expires: float | None = 86400.0
    result_extended: bool = False
    # Tasks
    task_serializer: str = "json"
    accept_content: list[str] = ["json"]
    task_default_queue: str = "celery"
    task_default_queue_type: str = "classic"
    task_create_missing_queue_type: str = "classic"
    task_queue_max_priority: int | None = None
    task_queues: Any = None
    task_default_priority: int | None = None
    task_routes: Any = None
    task_annotations: Any = None
    task_ignore_result: bool = False
    task_acks_late: bool = False
    task_acks_on_failure_or_timeout: bool = True
    task_reject_on_worker_lost: bool = False
    task_track_started: bool = False
    task_default_rate_limit: str | float | None = None
    task_default_global_rate_limit: str | float | None = None
    task_time_limit: float | None = None
    task_soft_time_limit: float | None = None
    task_default_retry_delay: float = 180.0
    task_always_eager: bool = False
    task_eager_propagates: bool = False
    task_publish_retry: bool = True
    task_publish_retry_policy: dict[str, float] = {
        "max_retries": 3,
        "interval_start": 0.0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }
    task_create_missing_queues: bool = True
    task_send_sent_event: bool = False
    # Worker
    worker_concurrency: int = 100
    worker_prefetch_multiplier: int = 4
    worker_shutdown_timeout: float = 10.0
    worker_state_db: str | None = None
    worker_processes: int | None = None
    """``worker --processes``: run this many supervised worker processes (None: one, unsupervised)."""
    worker_max_tasks_per_child: int | None = None
    worker_max_memory_per_child: int | None = None
    """Resident memory, in KiB, past which a worker process is replaced (Celery's unit)."""
    worker_hijack_root_logger: bool = True
    worker_send_task_events: bool = False
    worker_metrics_port: int | None = None
    """aqueue's own: serve Prometheus metrics on this port (``worker --metrics-port``)."""
    worker_metrics_address: str = "0.0.0.0"
    # Monitoring: Celery's events and remote control
    event_exchange: str = "celeryev"
    event_queue_prefix: str = "celeryev"
    event_queue_ttl: float | None = 5.0
    event_queue_expires: float | None = 60.0
    control_exchange: str = "celery"
    # Beat
    beat_schedule: dict[str, Any] = {}
    beat_max_loop_interval: float = 300.0
    beat_cron_starting_deadline: float | None = None
    beat_scheduler: str = "celery.beat:PersistentScheduler"
    beat_schedule_filename: str = "celerybeat-schedule"
    beat_sync_every: int = 0
    control_queue_ttl: float | None = 300.0
    control_queue_expires: float | None = 10.0
    # Time
    timezone: str | None = None
    enable_utc: bool = True
    # Modules
    imports: list[str] | tuple[str, ...] = ()
    include: list[str] | tuple[str, ...] = ()

    _listeners: list[Callable[[], None]] = PrivateAttr(default_factory=list)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every change, so that values worked out from settings can be cached."""
        self._listeners.append(callback)

    @field_validator(
        "result_expires",
        "task_time_limit",
        "task_soft_time_limit",
        "beat_max_loop_interval",
        "beat_cron_starting_deadline",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        return value.total_seconds() if isinstance(value, timedelta) else value

    @field_validator("task_default_rate_limit", "task_default_global_rate_limit")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        parse_rate(value)
        return value

    @field_validator("task_serializer", "result_serializer")
    @classmethod
    def _serializer(cls, value: str) -> str:
        try:
            get_serializer(value)
        except ImproperlyConfigured as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("accept_content", "result_accept_content")
    @classmethod
    def _content(cls, value: list[str] | None) -> list[str] | None:
        try:
            accepted_content_types(value or ())
        except ImproperlyConfigured as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone {value!r}: use an IANA name such as 'Europe/Oslo'"
                ) from None
        return value

    @field_validator("beat_max_loop_interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be a number of seconds above 0")
        return value

    @field_validator("beat_schedule")
    @classmethod
    def _beat_schedule(cls, value: dict[str, Any]) -> dict[str, Any]:
        from aqueue.beat import parse_schedule

        try:
            parse_schedule(value)
        except ImproperlyConfigured as exc:
            raise ValueError(str(exc)) from None
        return value

    def app_timezone(self) -> tzinfo:
        """Celery's ``app.timezone``, the zone crontab entries are read in: ``timezone``, else UTC, or the
        local zone when enable_utc is off."""
        if self.timezone:
            return zoneinfo.ZoneInfo(self.timezone)
        return UTC if self.enable_utc else _local_zone()

    def zone(self) -> tzinfo:
        """The zone naive ETA and expiry datetimes are read in: UTC unless enable_utc is off and a timezone is set."""
        if self.timezone and not self.enable_utc:
            return zoneinfo.ZoneInfo(self.timezone)
        return UTC

    @field_validator("task_default_queue_type", "task_create_missing_queue_type")
    @classmethod
    def _queue_type(cls, value: str) -> str:
        if value not in ("classic", "quorum"):
            raise ValueError("must be 'classic' or 'quorum' (RabbitMQ's queue types)")
        return value

    @field_validator("task_queues")
    @classmethod
    def _task_queues(cls, value: Any) -> Any:
        from aqueue.queues import QueueDeclarations

        QueueDeclarations.of(value)  # an entry it cannot read raises here, at the setting
        return value

    @field_validator("task_queue_max_priority")
    @classmethod
    def _max_priority(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 255:
            raise ValueError("must be from 1 to 255")
        return value

    @field_validator("worker_concurrency", "worker_prefetch_multiplier")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("worker_processes", "worker_max_tasks_per_child", "worker_max_memory_per_child")
    @classmethod
    def _positive_or_none(cls, value: int | None) -> int | None:
        return value if value is None else cls._positive(value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            return super().__setattr__(name, value)
        self._check(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise _invalid(exc) from None
        for callback in self._listeners:
            callback()
        if name in INERT and value != type(self).model_fields[name].default:
            logger.warning(
                "Setting %r is accepted for Celery compatibility but has no effect: %s.", name, INERT[name]
            )

    def update(self, mapping: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """Set several settings at once; every name is checked before any is set."""
        values = {**(mapping or {}), **settings}
        for name in values:
            self._check(name)
        for name, value in values.items():
            setattr(self, name, value)

    def config_from_object(self, obj: object | str) -> None:
        """Load settings from a module name, a module, or any object with setting attributes."""
        if isinstance(obj, str):
            try:
                obj = importlib.import_module(obj)
            except ImportError as exc:
                raise ImproperlyConfigured(f"Cannot import the configuration module {obj!r}: {exc}") from exc
        self.update(dict(_public_settings(obj, type(self).model_fields)))

    def from_environment(self) -> None:
        """Fill broker_url and result_backend from AQUEUE_* variables where they are not set."""
        for name, variable in _ENVIRONMENT.items():
            if getattr(self, name) is None and os.environ.get(variable):
                setattr(self, name, os.environ[variable])

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def __getitem__(self, name: str) -> Any:
        self._check(name)
        return getattr(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    def _check(self, name: str) -> None:
        if name not in type(self).model_fields:
            raise UnknownSetting(name, type(self).model_fields)


def _local_zone() -> tzinfo:
    """This machine's zone: ``TZ``, else /etc/localtime, else its current offset."""
    try:
        if os.environ.get("TZ"):
            return zoneinfo.ZoneInfo(os.environ["TZ"].lstrip(":"))
        with open("/etc/localtime", "rb") as file:
            return zoneinfo.ZoneInfo.from_file(file, key="localtime")
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        return datetime.now().astimezone().tzinfo or UTC


def _public_settings(obj: object, known: Container[str]) -> Iterator[tuple[str, Any]]:
    """The settings of a configuration object: known names, and lowercase non-callable attributes.

    A known name is taken whatever its value (``task_routes`` may be a router function).
    """
    items = obj.items() if isinstance(obj, Mapping) else ((k, getattr(obj, k)) for k in dir(obj))
    for name, value in items:
        if name in known:
            yield name, value
        elif name.startswith("_") or not name.islower():
            continue
        elif not (isinstance(value, types.ModuleType | type) or _is_function(value)):
            yield name, value


def _is_function(value: Any) -> bool:
    return isinstance(value, types.FunctionType | types.BuiltinFunctionType | Callable) and not isinstance(
        value, str | bytes | dict | list | tuple
    )


def _invalid(exc: ValidationError) -> ImproperlyConfigured:
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ImproperlyConfigured):
        return cause  # already says what is wrong (InvalidRate quotes the rate, ...)
    where = ".".join(str(part) for part in error["loc"])
    return ImproperlyConfigured(
        f"Invalid value for setting {where!r}: {error['msg']} (got {error.get('input')!r})"
    )
