"""Prometheus metrics: /metrics parses with prometheus_client's parser, and its numbers move with the tasks run."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from aqueue import App
from aqueue.exceptions import ImproperlyConfigured
from aqueue.message import Message
from aqueue.worker import Worker
from aqueue.worker.metrics import Metrics
from tests.monitoring.scenario import define_tasks

MakeApp = Callable[..., App]


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` by (name, labels), read with prometheus_client's own parser."""
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(url)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def by_task(samples: dict[Any, float], name: str, task: str) -> float:
    return samples.get((name, (("task", task),)), 0.0)


async def until(
    url: str, ready: Callable[[dict[Any, float]], bool], timeout: float = 5.0
) -> dict[Any, float]:
    with anyio.fail_after(timeout):
        while not ready(samples := await scrape(url)):
            await anyio.sleep(0.1)
    return samples


async def test_counters_and_histograms_move_with_the_tasks(make_app: MakeApp) -> None:
    app = make_app(worker_metrics_address="127.0.0.1")
    define_tasks(app)

    @app.task(name="tasks.limited", rate_limit="4/s")
    async def limited() -> None:
        pass

    async with app, Worker(app, concurrency=4, metrics_port=0) as worker:
        assert worker.monitoring.metrics_url is not None and worker.monitoring.metrics_url.startswith(
            "http://127.0.0.1:"
        )
        before = await scrape(worker.monitoring.metrics_url)
        assert by_task(before, "aqueue_tasks_succeeded_total", "tasks.add") == 0
        # When tasks succeed, fail, retry, are rejected, revoked, and wait for a rate limit
        adds = [app.send_task("tasks.add", [i, i]) for i in range(3)]
        await app.control.revoke("gone", destination=[worker.hostname])
        others = [app.send_task(name) for name in ("tasks.retry", "tasks.limited", "tasks.limited")]
        others += [app.send_task("tasks.fail", ["boom"]), app.send_task("tasks.reject")]
        app.send_task("tasks.add", [0, 0], task_id="gone")
        for result in [*adds, *others[:-1]]:
            await result.get(timeout=5, propagate=False)
        # Then the counters say so, by task name
        samples = await until(
            worker.monitoring.metrics_url,
            lambda s: (
                by_task(s, "aqueue_tasks_revoked_total", "tasks.add")
                == by_task(s, "aqueue_tasks_rejected_total", "tasks.reject")
                == 1
            ),
        )
    assert by_task(samples, "aqueue_tasks_received_total", "tasks.add") == 4
    assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.add") == 3
    assert by_task(samples, "aqueue_tasks_failed_total", "tasks.fail") == 1
    assert by_task(samples, "aqueue_tasks_retried_total", "tasks.retry") == 1
    assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.retry") == 1
    assert by_task(samples, "aqueue_tasks_rejected_total", "tasks.reject") == 1
    # And runtimes are histograms by task, and so are rate-limit waits (the second limited task waited)
    assert by_task(samples, "aqueue_task_runtime_seconds_count", "tasks.add") == 3
    assert by_task(samples, "aqueue_task_runtime_seconds_count", "tasks.fail") == 1
    assert by_task(samples, "aqueue_rate_limit_wait_seconds_count", "tasks.limited") == 1
    assert 0.1 < by_task(samples, "aqueue_rate_limit_wait_seconds_sum", "tasks.limited") < 1.0


async def test_gauges_count_active_and_prefetched_tasks(make_app: MakeApp) -> None:
    app = make_app(worker_metrics_address="127.0.0.1")
    release = anyio.Event()

    @app.task(name="tasks.block")
    async def block() -> None:
        await release.wait()

    async with app, Worker(app, concurrency=1, metrics_port=0, shutdown_timeout=1) as worker:
        assert worker.monitoring.metrics_url is not None
        # Given one task running and two waiting for the only slot
        results = [app.send_task("tasks.block") for _ in range(3)]
        samples = await until(
            worker.monitoring.metrics_url, lambda s: s.get(("aqueue_tasks_prefetched", ())) == 2
        )
        assert samples[("aqueue_tasks_active", ())] == 1
        # When they have run, both gauges fall to zero
        release.set()
        for result in results:
            await result.get(timeout=5)
        samples = await until(worker.monitoring.metrics_url, lambda s: s[("aqueue_tasks_active", ())] == 0)
        assert samples[("aqueue_tasks_prefetched", ())] == 0


async def test_metrics_are_off_by_default(make_app: MakeApp) -> None:
    app = make_app()
    async with app, Worker(app) as worker:
        assert worker.monitoring.metrics is None and worker.monitoring.metrics_url is None


async def test_a_port_in_use_is_a_clear_error(make_app: MakeApp) -> None:
    app = make_app(worker_metrics_address="127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ImproperlyConfigured, match=rf"Cannot serve metrics on 127.0.0.1:{port}.*--metrics-port"
        ):
            async with app, Worker(app, metrics_port=port):
                pass


def test_the_counts_read_as_prometheus_clients_own_counter_and_histogram_would() -> None:
    # Given aqueue's counts and prometheus_client's own metrics, told the same runtimes (bounds included)
    ours, theirs = Metrics(), CollectorRegistry()
    succeeded = Counter("aqueue_tasks_succeeded", "Tasks succeeded, by task name.", ["task"], registry=theirs)
    runtime = Histogram(
        "aqueue_task_runtime_seconds", "How long tasks ran, by task name.", ["task"], registry=theirs
    )
    for i, seconds in enumerate([0.0, 0.005, 0.0051, 0.3, 1.0, 10.0, 11.0, 2.5e-7]):
        task = "a" if i % 3 else "b"
        ours.after_success(Message(f"id-{i}", task), None, seconds)
        succeeded.labels(task).inc()
        runtime.labels(task).observe(seconds)

    def samples(registry: CollectorRegistry) -> dict[Any, float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            for sample in family.samples
            if family.name in ("aqueue_tasks_succeeded", "aqueue_task_runtime_seconds")
            and not sample.name.endswith("_created")
        }

    # Then /metrics gives the same series and values
    assert samples(ours.registry) == samples(theirs)
    assert samples(theirs)[("aqueue_task_runtime_seconds_bucket", (("le", "0.005"), ("task", "a")))] == 2
