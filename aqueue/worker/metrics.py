"""Prometheus metrics of a worker, served at ``/metrics`` by ``worker --metrics-port PORT``.

- ``aqueue_tasks_received_total``, ``aqueue_tasks_succeeded_total``, ``aqueue_tasks_failed_total``,
  ``aqueue_tasks_retried_total``, ``aqueue_tasks_rejected_total``, ``aqueue_tasks_revoked_total``:
  counters by ``task`` (the task's name);
- ``aqueue_task_runtime_seconds``: a histogram of how long tasks ran, by ``task``;
- ``aqueue_rate_limit_wait_seconds``: a histogram of how long tasks waited for their rate limit's
  token, by ``task``;
- ``aqueue_tasks_active`` (running) and ``aqueue_tasks_prefetched`` (received, waiting for a slot or a
  token): gauges, brought up to date every second.

Counting is a few integer increments per task, on plain Python numbers (each task name's are looked up
once): a collector turns them into prometheus_client's metric families when ``/metrics`` is scraped, so
no lock is taken per task. The HTTP server is prometheus_client's, on a thread of its own. With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client's multiprocess mode is used instead: each process
keeps its values in that folder through prometheus_client's own counters and histograms, and the one
serving ``/metrics`` adds them up (so one endpoint serves several worker processes; this is how
``worker --processes N`` serves its children's, see :mod:`aqueue.worker.supervised_metrics`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from aqueue.exceptions import ImproperlyConfigured
from aqueue.message import Message
from aqueue.worker.observer import Observer

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise ImproperlyConfigured(
        "Worker metrics need the 'prometheus_client' package, which is not installed. "
        "Install it with: pip install 'aqueue[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from aqueue.worker.worker import Worker

__all__ = ["Metrics", "MetricsServer", "in_multiprocess_mode", "multiprocess_registry"]

logger = logging.getLogger("aqueue.worker")

REFRESH = 1.0
"""Seconds between updates of the gauges."""
_COUNTED = ("received", "succeeded", "failed", "retried", "rejected", "revoked")


def in_multiprocess_mode() -> bool:
    """True when this process keeps its values in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client reads it once)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def multiprocess_registry(folder: str | None = None) -> CollectorRegistry:
    """A registry adding up what every process left in ``folder`` (default: ``PROMETHEUS_MULTIPROC_DIR``)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return registry


_HELP = {kind: f"Tasks {kind}, by task name." for kind in _COUNTED}
_TIMED = ("runtime", "waited")
"""The histograms, after the counters."""
_HELP["runtime"] = "How long tasks ran, by task name."
_HELP["waited"] = "How long tasks waited for their rate limit's token, by task name."
_NAMES = {kind: f"aqueue_tasks_{kind}" for kind in _COUNTED}
_NAMES |= {"runtime": "aqueue_task_runtime_seconds", "waited": "aqueue_rate_limit_wait_seconds"}


class Metrics(Observer):
    """Counts what the worker does into Prometheus metrics (in ``registry``, or a new one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._tasks: dict[str, _TaskMetrics] = {}
        # In multiprocess mode the values live in files; the serving process collects them.
        owner = None if in_multiprocess_mode() else self.registry
        self._files: dict[str, Counter | Histogram] | None = None
        if owner is None:
            self._files = {
                kind: Counter(_NAMES[kind], _HELP[kind], ["task"], registry=None) for kind in _COUNTED
            }
            for kind in _TIMED:
                self._files[kind] = Histogram(_NAMES[kind], _HELP[kind], ["task"], registry=None)
        else:
            owner.register(_Collector(self))
        self.active = Gauge(
            "aqueue_tasks_active", "Tasks running.", registry=owner, multiprocess_mode="livesum"
        )
        self.prefetched = Gauge(
            "aqueue_tasks_prefetched",
            "Tasks received and waiting for a slot or a rate-limit token.",
            registry=owner,
            multiprocess_mode="livesum",
        )

    def _of(self, name: str) -> _TaskMetrics:
        found = self._tasks.get(name)
        if found is None:
            files = self._files
            if files is None:
                series: list[Any] = [_Count() for _ in _COUNTED] + [_Histogram() for _ in _TIMED]
            else:
                series = [files[kind].labels(name) for kind in _TaskMetrics.KINDS]
            found = self._tasks[name] = _TaskMetrics(time.time(), *series)
        return found

    def after_receive(self, message: Message) -> None:
        self._of(message.task).received.inc()

    def after_rate_limit(self, message: Message, waited: float) -> None:
        self._of(message.task).waited.observe(waited)

    def after_skip(self, message: Message, why: str) -> None:
        if why in ("revoked", "expired"):
            self._of(message.task).revoked.inc()

    def after_success(self, message: Message, result: Any, runtime: float) -> None:
        task = self._of(message.task)
        task.succeeded.inc()
        task.runtime.observe(runtime)

    def after_failure(self, message: Message, exc: BaseException, traceback: str, runtime: float) -> None:
        task = self._of(message.task)
        task.failed.inc()
        task.runtime.observe(runtime)

    def after_retry(self, message: Message, exc: BaseException, traceback: str | None) -> None:
        self._of(message.task).retried.inc()

    def after_reject(self, message: Message, requeue: bool) -> None:
        self._of(message.task).rejected.inc()

    async def track(self, worker: Worker) -> None:
        """Keep the gauges up to date with ``worker`` until cancelled."""
        while True:
            self.active.set(len(worker.state.active))
            self.prefetched.set(_prefetched(worker))
            await asyncio.sleep(REFRESH)


@dataclass(slots=True)
class _TaskMetrics:
    """One task name's series, looked up once (fields in the order of ``KINDS``): prometheus_client's in
    multiprocess mode, :class:`_Count` and :class:`_Histogram` otherwise; when they were made)."""

    created: float
    received: Any
    succeeded: Any
    failed: Any
    retried: Any
    rejected: Any
    revoked: Any
    runtime: Any
    waited: Any

    KINDS: ClassVar[tuple[str, ...]] = (*_COUNTED, *_TIMED)


class _Count:
    """A counter that is a plain number (read by the collector's thread: an int is read whole)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


_BOUNDS = Histogram.DEFAULT_BUCKETS
"""prometheus_client's default buckets, ending with +Inf."""
_LE = tuple(floatToGoString(bound) for bound in _BOUNDS)  # type: ignore[no-untyped-call]


class _Histogram:
    """prometheus_client's histogram with its default buckets, as plain numbers: a count per bucket."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, value)] += 1  # a bucket counts values <= its bound
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as Prometheus reads them."""
        total, out = 0, []
        for le, count in zip(_LE, list(self.counts), strict=True):
            total += count
            out.append((le, float(total)))
        return out


class _Collector(Collector):
    """Reads the plain numbers of :class:`Metrics` when ``/metrics`` is scraped (on the server's thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        tasks = list(self.metrics._tasks.items())  # the loop may add a task name meanwhile
        for kind in _COUNTED:
            counter = CounterMetricFamily(_NAMES[kind], _HELP[kind], labels=["task"])
            for name, series in tasks:
                counter.add_metric([name], getattr(series, kind).value, created=series.created)
            yield counter
        for kind in _TIMED:
            histogram = HistogramMetricFamily(_NAMES[kind], _HELP[kind], labels=["task"])
            for name, series in tasks:
                observed: _Histogram = getattr(series, kind)
                histogram.add_metric([name], observed.buckets(), observed.sum)
            yield histogram


def _prefetched(worker: Worker) -> int:
    waiting = len(worker.slots.queued())
    for runtime in worker.runtimes.values():
        waiting += runtime.bucket.statistics().waiting
        if runtime.shared is not None:
            waiting += runtime.shared.statistics().waiting
    return waiting


class MetricsServer:
    """prometheus_client's HTTP server for ``registry`` on ``address:port`` (port 0: any free port)."""

    def __init__(self, registry: CollectorRegistry, port: int, address: str = "0.0.0.0") -> None:
        self.registry, self.address, self.requested = registry, address, port
        self._server: WSGIServer | None = None

    @property
    def port(self) -> int:
        """The port served (the one chosen when 0 was asked for)."""
        return self._server.server_port if self._server is not None else self.requested

    def start(self) -> None:
        """Start serving.

        Raises:
            ImproperlyConfigured: the port cannot be used (taken, or not allowed).
        """
        try:
            self._server, _ = prometheus_client.start_http_server(self.requested, self.address, self.registry)
        except OSError as exc:
            raise ImproperlyConfigured(
                f"Cannot serve metrics on {self.address}:{self.requested}: {exc.strerror or exc}. "
                "Choose another --metrics-port (worker_metrics_port)."
            ) from exc
        logger.info("Serving Prometheus metrics on http://%s:%d/metrics", self.address, self.port)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            stop: Callable[[], None] = server.shutdown
            await asyncio.to_thread(stop)
            server.server_close()
