"""App: configuration, the task registry, ``@app.task``, ``send_task``, and the app's connections."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    Unpack,
    overload,
)

from aqueue._compat import AsyncResource
from aqueue.broker import Broker
from aqueue.broker import from_url as broker_from_url
from aqueue.config import DEFAULT_BROKER_URL, Settings
from aqueue.exceptions import NotRegistered
from aqueue.message import Envelope, Message, encode_message
from aqueue.publish import Publisher, RetryPolicy
from aqueue.result import AsyncResult, ResultBackend
from aqueue.result import from_url as backend_from_url
from aqueue.routing import Router
from aqueue.serialization import Serializer, get_serializer
from aqueue.task import Task, TaskOptionArgs, TaskOptions

if TYPE_CHECKING:
    from aqueue.control import Control

__all__ = ["App", "Celery"]

P = ParamSpec("P")
R = TypeVar("R")


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class _BoundDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], R], /) -> Task[P, R]: ...


@dataclass(frozen=True, slots=True)
class _SendSpec:
    """What sending one task needs, worked out once per task name and configuration."""

    queue: str | None
    serializer: Serializer
    ignore_result: bool
    priority: int | None
    convert: Callable[[Any], Any] | None


class App(AsyncResource):
    """An aqueue application: ``App('tasks', broker='redis://localhost', backend='redis://localhost')``.

    Parameters:
        main: the app's name; tasks defined in ``__main__`` are named after it.
        broker: the broker URL (else the ``broker_url`` setting, ``AQUEUE_BROKER_URL``, or the embedded
            ``sqlite:///aqueue.db``).
        backend: the result backend URL (else ``result_backend`` / ``AQUEUE_RESULT_BACKEND``; none by default).
        config_source: an object or module name passed to :meth:`config_from_object`.
        settings: any other setting, by its Celery name.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        config_source: object | str | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.conf.config_from_object(config_source)
        self.conf.update(settings)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not None:
            self.conf.result_backend = backend
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._publisher: Publisher | None = None
        self._connected = False
        self._connecting: asyncio.Lock | None = None
        self._specs: dict[str, _SendSpec] = {}
        self._router: Router | None = None
        self._eager = self.conf.task_always_eager
        self.conf.on_change(self._settings_changed)

    # Configuration ------------------------------------------------------------------------------

    def config_from_object(self, obj: object | str) -> None:
        """Load settings from a module name, a module, or an object (as Celery's)."""
        self.conf.config_from_object(obj)

    @property
    def broker_url(self) -> str:
        """The broker URL in force: setting, then ``AQUEUE_BROKER_URL``, then the embedded default."""
        self.conf.from_environment()
        return self.conf.broker_url or DEFAULT_BROKER_URL

    @property
    def broker(self) -> Broker:
        """The app's broker (created on first use, connected by ``async with app`` or on first publish)."""
        if self._broker is None:
            self._broker = broker_from_url(self.broker_url, self.conf.broker_transport_options)
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        """The app's result backend; a disabled one when ``result_backend`` is not set."""
        if self._backend is None:
            self.conf.from_environment()
            self._backend = backend_from_url(
                self.conf.result_backend,
                serializer=self.conf.result_serializer,
                expires=self.conf.result_expires,
                broker_url=self.broker_url,
                options=self.conf.result_backend_transport_options,
            )
        return self._backend

    @property
    def control(self) -> Control:
        """Remote control of this app's workers (``rate_limit``, ``ping``, ...)."""
        from aqueue.control import Control

        return Control(self)

    # Tasks -------------------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self, *, bind: Literal[True], name: str | None = None, **options: Unpack[TaskOptionArgs]
    ) -> _BoundDecorator: ...
    @overload
    def task(
        self, *, bind: Literal[False] = False, name: str | None = None, **options: Unpack[TaskOptionArgs]
    ) -> _Decorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        bind: bool = False,
        name: str | None = None,
        **options: Unpack[TaskOptionArgs],
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True, ...)``.

        Options: ignore_result, rate_limit, acks_late, queue, serializer, max_retries,
        default_retry_delay, time_limit, soft_time_limit, track_started, priority, autoretry_for.
        """
        try:
            task_options = TaskOptions(**options)
        except TypeError:
            from aqueue.exceptions import ImproperlyConfigured

            known = ", ".join(TaskOptions.__dataclass_fields__)
            raise ImproperlyConfigured(f"Unknown task option in {sorted(options)}: use {known}") from None
        from aqueue.rates import parse_rate

        parse_rate(task_options.rate_limit)
        parse_rate(task_options.global_rate_limit)

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            task: Task[Any, Any] = Task(self, fn, name or self.gen_task_name(fn), bind, task_options)
            self.tasks[task.name] = task
            return task

        return register(fn) if fn is not None else register

    def import_modules(self) -> None:
        """Import the modules named by the ``imports`` and ``include`` settings (their tasks register).

        Raises:
            ImproperlyConfigured: a module cannot be imported (its name and the error are given).
        """
        import importlib

        from aqueue.exceptions import ImproperlyConfigured

        for name in (*self.conf.imports, *self.conf.include):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ImproperlyConfigured(f"Cannot import {name!r} named in imports/include: {exc}") from exc

    def gen_task_name(self, fn: Callable[..., Any]) -> str:
        """Celery's naming: ``module.function``, with ``__main__`` replaced by the app's name."""
        module = fn.__module__
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fn.__name__}"

    def annotation(self, name: str) -> dict[str, Any]:
        """The ``task_annotations`` entry for a task (its own name, or ``'*'``)."""
        annotations = self.conf.task_annotations
        if not annotations:
            return {}
        tables = annotations if isinstance(annotations, list | tuple) else [annotations]
        merged: dict[str, Any] = {}
        for table in tables:
            merged.update(table.get("*", {}))
            merged.update(table.get(name, {}))
        return merged

    # Sending ------------------------------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task: Task[Any, Any] | None = None,
        task_id: str | None = None,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime | float | None = None,
        expires: datetime | float | None = None,
        headers: dict[str, Any] | None = None,
        ignore_result: bool | None = None,
        serializer: str | None = None,
        priority: int | None = None,
    ) -> AsyncResult[Any]:
        """Send a task by name (it need not be registered here); returns its :class:`AsyncResult` at once.

        Raises:
            EncodeError: an argument cannot be serialized (it is named).
        """
        spec = self._spec(name, task)
        if self._eager:
            from aqueue.eager import apply_eager

            return apply_eager(self, self.tasks.get(name) or _unregistered(name), args, kwargs, task_id)
        ignored = spec.ignore_result if ignore_result is None else ignore_result
        eta_ts = _when(eta, countdown, self.conf)
        message = Message(
            task_id or str(uuid.uuid4()),
            name,
            args or (),
            kwargs or {},
            0,
            eta_ts,
            _expiry(expires, self.conf),
            ignored,
            None,
            headers,
        )
        backend = self.backend
        backend.prepare(message)
        codec = spec.serializer if serializer is None else get_serializer(serializer)
        target = queue or spec.queue or self._route(name, task, args, kwargs)
        envelope = Envelope(
            message.id,
            target,
            encode_message(message, codec),
            codec.content_type,
            eta_ts,
            spec.priority if priority is None else priority,
        )
        sent = self.publisher.submit(envelope)
        return AsyncResult(
            message.id, backend, sent=sent, ignored=ignored, task_name=name, convert=spec.convert
        )

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A result handle for any task id."""
        return AsyncResult(task_id, self.backend)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            policy = self.conf.task_publish_retry_policy if self.conf.task_publish_retry else None
            self._publisher = Publisher(self._publish, RetryPolicy(**policy) if policy else None)
        return self._publisher

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        if not self._connected:
            await self.connect()
        await self.broker.publish(envelopes)

    def _spec(self, name: str, task: Task[Any, Any] | None) -> _SendSpec:
        spec = self._specs.get(name)
        if spec is None:
            spec = self._specs[name] = self._make_spec(name, task or self.tasks.get(name))
        return spec

    def _settings_changed(self) -> None:
        """What sending works out once per task name is worked out again after a settings change."""
        self._specs.clear()
        self._router = None
        self._eager = self.conf.task_always_eager

    def _make_spec(self, name: str, task: Task[Any, Any] | None) -> _SendSpec:
        conf, options = self.conf, task.options if task else TaskOptions()
        annotated = self.annotation(name)
        router = self.router
        static_queue = None if router.dynamic else router.queue_for(name, options.queue)
        ignore = options.ignore_result
        if ignore is None:  # the worker reads task_annotations too: agree with it on what is stored
            ignore = bool(annotated.get("ignore_result", conf.task_ignore_result))
        return _SendSpec(
            static_queue,
            get_serializer(options.serializer or annotated.get("serializer") or conf.task_serializer),
            ignore,
            options.priority if options.priority is not None else conf.task_default_priority,
            task.result_type if task is not None else None,
        )

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.conf.task_routes, self.conf.task_default_queue)
        return self._router

    def _route(self, name: str, task: Task[Any, Any] | None, args: Any, kwargs: Any) -> str:
        return self.router.queue_for(name, task.options.queue if task else None, args, kwargs)

    # Connections --------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the broker and result backend connections (done for you on first publish)."""
        if self._connected:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if not self._connected:
                await self.broker.connect()
                await self.backend.connect()
                self._connected = True

    async def aclose(self) -> None:
        """Finish pending publishes, then close the broker and backend connections."""
        if self._publisher is not None:
            await self._publisher.drain()
        if self._broker is not None:
            await self._broker.aclose()
        if self._backend is not None:
            await self._backend.aclose()
        self._connected = False

    def __repr__(self) -> str:
        return f"<App {self.main or '__main__'} at {id(self):#x}>"


Celery = App
"""Celery's name for :class:`App`."""


def _unregistered(name: str) -> Task[Any, Any]:
    raise NotRegistered(name)


def _timestamp(when: datetime, conf: Settings) -> float:
    """Unix time of ``when``; a naive datetime is read in the app's zone (UTC unless enable_utc is off)."""
    return (when if when.tzinfo is not None else when.replace(tzinfo=conf.zone())).timestamp()


def _when(eta: datetime | float | None, countdown: float | None, conf: Settings) -> float | None:
    if eta is not None:
        return _timestamp(eta, conf) if isinstance(eta, datetime) else float(eta)
    if countdown:
        return time.time() + countdown
    return None


def _expiry(expires: datetime | float | None, conf: Settings) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return _timestamp(expires, conf)
    return time.time() + float(expires)
