"""App: configuration, the task registry, ``@app.task``, ``send_task``, and the app's connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
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
from aqueue.events import EventDispatcher, task_sent_fields
from aqueue.exceptions import AqueueError, NotRegistered
from aqueue.ids import new_id
from aqueue.message import Envelope, Message
from aqueue.options import (
    ResolvedOptions,
    SendOptions,
    TaskOptionArgs,
    TaskOptions,
    apply_call_options,
    resolve,
)
from aqueue.publish import Publisher, RetryPolicy
from aqueue.queues import QueueDeclarations
from aqueue.result import AsyncResult, ResultBackend
from aqueue.result import from_url as backend_from_url
from aqueue.routing import Router
from aqueue.serialization import Serializer, get_serializer
from aqueue.signals import Signal
from aqueue.task import Task, _request

if TYPE_CHECKING:
    from aqueue.control import Control

__all__ = ["App", "Celery", "current_app"]

_current: App | None = None


def current_app() -> App:
    """The app created last in this process (Celery's ``current_app``), for signatures made by name.

    Raises:
        AqueueError: no app was created yet.
    """
    if _current is None:
        raise AqueueError(
            "No aqueue app exists yet: create one with App(...) before sending signatures by task name, "
            "or pass app=... to signature()."
        )
    return _current


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
    expires: float | None
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
        self.builtins: dict[str, Task[Any, Any]] = {}
        """Tasks every worker runs besides the app's own: ``celery.map``, ``celery.starmap``, ``celery.chunks``."""
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._publisher: Publisher | None = None
        self._connected = False
        self._connecting: asyncio.Lock | None = None
        self._specs: dict[str, _SendSpec] = {}
        self._options: dict[str, ResolvedOptions] = {}
        self._router: Router | None = None
        self._eager = self.conf.task_always_eager
        self._sent_events: EventDispatcher | None = None
        self._send_sent_event = self.conf.task_send_sent_event
        self.conf.on_change(self._settings_changed)
        self.on_after_configure = Signal("on_after_configure")
        self.on_after_finalize = Signal("on_after_finalize")
        self._finalized = False
        global _current
        _current = self
        from aqueue.canvas import register_builtins

        register_builtins(self)

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
            conf = self.conf
            queues = QueueDeclarations.of(
                conf.task_queues,
                default_queue=conf.task_default_queue,
                default_type=conf.task_default_queue_type,
                missing_type=conf.task_create_missing_queue_type,
                max_priority=conf.task_queue_max_priority,
            )
            self._broker = broker_from_url(self.broker_url, conf.broker_transport_options, queues=queues)
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

        Options (:class:`~aqueue.options.TaskOptions`): ignore_result, rate_limit, global_rate_limit,
        acks_late, acks_on_failure_or_timeout, queue, serializer, max_retries, default_retry_delay,
        time_limit, soft_time_limit, track_started, priority, expires, autoretry_for, retry_kwargs,
        retry_backoff, retry_backoff_max, retry_jitter.

        Raises:
            ImproperlyConfigured: an unknown option (the known ones are listed) or a bad rate limit.
        """
        task_options = TaskOptions.of(options)

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            task: Task[Any, Any] = Task(self, fn, name or self.gen_task_name(fn), bind, task_options)
            self.tasks[task.name] = task
            self._options.pop(task.name, None)  # resolved before the task existed: resolve again
            self._specs.pop(task.name, None)
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

    # Periodic tasks -------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Send ``on_after_configure``, then ``on_after_finalize``, once (beat calls it at start)."""
        if not self._finalized:
            self._finalized = True
            self.on_after_configure.send(sender=self, source=self.conf)
            self.on_after_finalize.send(sender=self)

    def add_periodic_task(
        self,
        schedule: Any,
        sig: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        **options: Any,
    ) -> str:
        """Celery's: add ``sig`` (a signature, a task or its name) to ``beat_schedule``; returns the entry.

        Raises:
            InvalidSchedule: the schedule, the signature or an option cannot be used.
        """
        from aqueue.beat import add_periodic_task

        return add_periodic_task(self, schedule, sig, args, kwargs, name, options)

    # Sending ------------------------------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task: Task[Any, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult[Any]:
        """Send a task by name (it need not be registered here); returns its :class:`AsyncResult` at once.

        ``options`` are those of ``apply_async`` (:class:`~aqueue.options.SendOptions`); an option not
        given falls back to the task's own, then its ``task_annotations`` entry, then the setting. Sent
        from inside a running task, the new task gets that task as its parent and shares its root.

        Raises:
            EncodeError: an argument cannot be serialized (it is named).
            ImproperlyConfigured: an unknown option (the closest is named) or a bad value.
        """
        spec = self._spec(name, task)
        if self._eager:
            from aqueue.eager import apply_eager

            task_id = options.get("task_id")
            return apply_eager(self, self.tasks.get(name) or _unregistered(name), args, kwargs, task_id)
        message = Message(
            id=options.get("task_id") or new_id(),
            task=name,
            args=args or (),
            kwargs=kwargs or {},
            ignore_result=spec.ignore_result,
            priority=spec.priority,
        )
        request = _request.get(None)
        if request is not None and request.id is not None and not request.called_directly:
            message.root_id, message.parent_id = request.root_id or request.id, request.id
        serializer, queue = spec.serializer, spec.queue
        if options:
            chosen, queue = apply_call_options(message, options, self.conf)
            serializer = spec.serializer if chosen is None else get_serializer(chosen)
            queue = queue or spec.queue
        if message.expires is None and spec.expires is not None:
            message.expires = time.time() + spec.expires
        self.backend.prepare(message)
        sent = self.send_message(message, queue or self._route(name, task, args, kwargs), serializer)
        return AsyncResult(
            message.id,
            self.backend,
            sent=sent,
            ignored=message.ignore_result,
            task_name=name,
            convert=spec.convert,
        )

    def send_message(self, message: Message, queue: str, serializer: Serializer) -> asyncio.Future[None]:
        """Publish ``message`` to ``queue``: the one place a message becomes an envelope.

        Every send goes through here: ``send_task``, the worker's retries and give-backs, workflow steps.
        Returns the future the broker's acceptance completes.

        Raises:
            EncodeError: an argument cannot be serialized (it is named).
        """
        body, headers = self.broker.codec.encode(message, serializer)
        envelope = Envelope(
            message.id,
            queue,
            body,
            serializer.content_type,
            message.eta,
            message.priority,
            headers,
            reply_to=message.reply_to,
        )
        sent = self.publisher.submit(envelope)
        if self._send_sent_event:
            self.sent_events.send("task-sent", **task_sent_fields(message, queue))
        return sent

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A result handle for any task id."""
        return AsyncResult(task_id, self.backend)

    def options_for(self, name: str) -> ResolvedOptions:
        """The options of task ``name`` (registered or not) after resolution: task > annotation > setting."""
        found = self._options.get(name)
        if found is None:
            task = self.tasks.get(name)
            own = task.options if task is not None else TaskOptions()
            found = self._options[name] = resolve(own, self.annotation(name), self.conf)
        return found

    @property
    def sent_events(self) -> EventDispatcher:
        """Sends this process's ``task-sent`` events (``task_send_sent_event``)."""
        if self._sent_events is None:
            self._sent_events = EventDispatcher.for_client(self)
        return self._sent_events

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
        """What is worked out once per task name is worked out again after a settings change."""
        self._specs.clear()
        self._options.clear()
        self._router = None
        self._eager = self.conf.task_always_eager
        self._send_sent_event = self.conf.task_send_sent_event

    def _make_spec(self, name: str, task: Task[Any, Any] | None) -> _SendSpec:
        resolved = self.options_for(name)
        router = self.router
        return _SendSpec(
            None if router.dynamic else router.queue_for(name, resolved.queue),
            get_serializer(resolved.serializer),
            resolved.ignore_result,
            resolved.priority,
            resolved.expires,
            task.result_type if task is not None else None,
        )

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.conf.task_routes, self.conf.task_default_queue)
        return self._router

    def _route(self, name: str, task: Task[Any, Any] | None, args: Any, kwargs: Any) -> str:
        return self.router.queue_for(name, self.options_for(name).queue, args, kwargs)

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
        if self._sent_events is not None:
            await self._sent_events.aclose()
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
