"""One task run: settings in force, acknowledgement, predicates, retries, skips, storing and logging."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aqueue import App, Task, states
from aqueue.broker.memory import MemoryBroker, _MemoryConsumer
from aqueue.exceptions import EncodeError, Ignore, MaxRetriesExceededError, Reject, Retry
from aqueue.worker import Worker
from aqueue.worker.execution import TaskRuntime

MakeApp = Callable[..., App]


def memory_broker(app: App) -> MemoryBroker:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return broker


def test_runtime_settings_task_option_then_annotation_then_setting(make_app: MakeApp) -> None:
    # Given settings, an annotation for one task, and options on another
    app = make_app(
        task_acks_late=True,
        task_track_started=True,
        task_time_limit=30,
        task_default_rate_limit="5/s",
        task_annotations={
            "tasks.annotated": {"acks_late": False, "rate_limit": "10/m", "ignore_result": True}
        },
    )

    @app.task(name="tasks.plain")
    async def plain() -> None: ...

    @app.task(name="tasks.annotated")
    async def annotated() -> None: ...

    @app.task(name="tasks.own", acks_late=False, track_started=False, time_limit=2, rate_limit="1/h")
    async def own() -> None: ...

    runtimes = {task.name: TaskRuntime.build(app, task) for task in (plain, annotated, own)}
    summary = {
        name: (r.acks_late, r.ignore_result, r.track_started, r.time_limit, str(r.bucket.rate))
        for name, r in runtimes.items()
    }
    # Then each value comes from the most specific place that sets it
    assert summary == {
        "tasks.plain": (True, False, True, 30, "5/s"),
        "tasks.annotated": (False, True, True, 30, "10/m"),
        "tasks.own": (False, False, False, 2, "1/h"),
    }


async def test_early_ack_settles_the_delivery_before_the_task_runs(make_app: MakeApp) -> None:
    app = make_app()
    started, release = anyio.Event(), anyio.Event()

    @app.task
    async def job() -> None:
        started.set()
        await release.wait()

    async with app, Worker(app) as worker:
        result = job.delay()
        with anyio.fail_after(5):
            await started.wait()
        assert worker._loop is not None and worker._loop.consumer.held == {}
        release.set()
        await result.get(timeout=5)


async def test_ignore_stores_nothing_and_acknowledges(make_app: MakeApp) -> None:
    app = make_app()
    ran = anyio.Event()

    @app.task
    async def job() -> None:
        ran.set()
        raise Ignore()

    async with app, Worker(app) as worker:
        result = job.delay()
        with anyio.fail_after(5):
            await ran.wait()
        await anyio.sleep(0.05)
        assert await result.refresh() == states.PENDING
        assert worker._loop is not None and worker._loop.consumer.held == {}


async def test_reject_dead_letters_and_reject_with_requeue_runs_again(make_app: MakeApp) -> None:
    app = make_app()
    calls: list[str] = []

    @app.task(acks_late=True)
    async def job(kind: str) -> str:
        calls.append(kind)
        if kind == "dead":
            raise Reject("poison", requeue=False)
        if calls.count("again") == 1:
            raise Reject("later", requeue=True)
        return "done"

    async with app, Worker(app):
        dead = await job.delay("dead")
        assert await job.delay("again").get(timeout=5) == "done"
    # Then the rejected message is dead-lettered, and the requeued one ran twice
    assert [e.id for e in await app.broker.dead_letters(app.conf.task_default_queue)] == [dead.id]
    assert calls.count("again") == 2 and calls.count("dead") == 1


async def test_retry_stores_retry_then_runs_again_with_retries_counted(make_app: MakeApp) -> None:
    app = make_app()
    seen: list[int] = []

    @app.task(bind=True)
    async def flaky(self: Task[Any, Any]) -> int:
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(exc=ConnectionError("flaky"), countdown=0.3 if not seen[:-1] else 0.01)
        return self.request.retries

    async with app, Worker(app):
        result = flaky.delay()
        # While it waits to retry, its state is RETRY with the cause
        with anyio.fail_after(5):
            while await result.refresh() != states.RETRY:
                await anyio.sleep(0.01)
        assert isinstance(result.result, ConnectionError)
        assert await result.get(timeout=5) == 2
    assert seen == [0, 1, 2]


async def test_past_max_retries_the_task_fails(make_app: MakeApp) -> None:
    app = make_app()
    runs: list[int] = []

    @app.task(bind=True, max_retries=2)
    async def always(self: Task[Any, Any]) -> None:
        runs.append(1)
        raise self.retry(countdown=0)

    @app.task(bind=True, max_retries=1)
    async def with_cause(self: Task[Any, Any]) -> None:
        raise self.retry(exc=LookupError("still missing"), countdown=0)

    async with app, Worker(app):
        with pytest.raises(MaxRetriesExceededError, match="Can't retry"):
            await always.delay().get(timeout=5)
        with pytest.raises(LookupError, match="still missing"):
            await with_cause.delay().get(timeout=5)
    assert len(runs) == 3


async def test_autoretry_for_retries_listed_exceptions(make_app: MakeApp) -> None:
    app = make_app()
    runs: list[int] = []

    @app.task(autoretry_for=(ConnectionError,), default_retry_delay=0.01, max_retries=3)
    async def flaky() -> int:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("try again")
        return len(runs)

    @app.task(autoretry_for=(ConnectionError,), default_retry_delay=0.01)
    async def other() -> None:
        raise ValueError("not listed")

    async with app, Worker(app):
        assert await flaky.delay().get(timeout=5) == 3
        with pytest.raises(ValueError, match="not listed"):
            await other.delay().get(timeout=5)


async def test_revoked_task_is_not_run(make_app: MakeApp) -> None:
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job() -> None:
        ran.append(1)

    async with app, Worker(app) as worker:
        worker.state.revoke(["revoked-id"])
        result = job.apply_async(task_id="revoked-id")
        with anyio.fail_after(5):
            while await result.refresh() != states.REVOKED:
                await anyio.sleep(0.01)
    assert ran == [] and result.result is not None


async def test_a_redelivered_copy_of_a_finished_task_is_acknowledged_without_running(
    make_app: MakeApp,
) -> None:
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job() -> int:
        ran.append(1)
        return 1

    async with app:
        # Given a task whose result is stored, and a copy of its message that is being redelivered
        result = await job.delay()
        async with app.broker.consume([app.conf.task_default_queue], 1) as consumer:
            delivery = await consumer.receive()
            await delivery.requeue()
        await app.backend.store(_success(result.id))
        # When a worker receives the copy
        async with Worker(app) as worker:
            with anyio.fail_after(5):
                while worker.state.total[job.name] == 0 and memory_broker(app).store.queues[delivery.queue]:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.05)
    # Then it did not run it again
    assert ran == []


def _success(task_id: str) -> Any:
    from aqueue.result import TaskMeta

    return TaskMeta(task_id, states.SUCCESS, 1)


async def test_sync_task_failure_is_stored_with_its_traceback(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    def divide(x: int, y: int) -> float:
        return x / y

    async with app, Worker(app):
        result = divide.delay(1, 0)
        with pytest.raises(ZeroDivisionError):
            await result.get(timeout=5)
    assert result.traceback is not None and "return x / y" in result.traceback


async def test_success_and_failure_are_logged_with_the_task_id(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aqueue")
    app = make_app()

    @app.task(name="tasks.echo")
    async def echo(value: str) -> str:
        if value == "boom":
            raise RuntimeError("boom!")
        return value

    async with app, Worker(app):
        ok = echo.delay("hello")
        bad = echo.delay("boom")
        await ok.get(timeout=5)
        await bad.get(timeout=5, propagate=False)
    text = caplog.text
    assert f"Task tasks.echo[{ok.id}] received" in text
    assert f"Task tasks.echo[{ok.id}] succeeded in" in text and "'hello'" in text
    assert f"Task tasks.echo[{bad.id}] raised unexpected: RuntimeError('boom!')" in text


async def test_a_result_that_cannot_be_stored_fails_the_task_with_encode_error(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def opaque() -> object:
        return object()

    async with app, Worker(app):
        with pytest.raises(EncodeError, match=r"object.*json"):
            await opaque.delay().get(timeout=5)


async def test_ignore_result_on_the_task_stores_no_success(make_app: MakeApp) -> None:
    app = make_app()
    done = anyio.Event()

    @app.task(ignore_result=True)
    async def job() -> int:
        done.set()
        return 1

    async with app, Worker(app):
        result = job.delay()
        with anyio.fail_after(5):
            await done.wait()
        await anyio.sleep(0.05)
        assert await app.AsyncResult(result.id).refresh() == states.PENDING


async def test_retry_raised_directly_without_retry_call(make_app: MakeApp) -> None:
    app = make_app()
    runs: list[int] = []

    @app.task
    async def job() -> int:
        runs.append(1)
        if len(runs) == 1:
            raise Retry(when=0.01)
        return len(runs)

    async with app, Worker(app):
        assert await job.delay().get(timeout=5) == 2


# Admission: a delivery gets its task only when it can start; the line is FIFO ------------------------


async def _until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


def _most_at_once(events: list[tuple[str, int]]) -> int:
    running = most = 0
    for what, _ in events:
        running += 1 if what == "start" else -1
        most = max(most, running)
    return most


async def test_at_most_concurrency_run_and_they_start_in_arrival_order(make_app: MakeApp) -> None:
    app = make_app()
    events: list[tuple[str, int]] = []
    tasks_seen: list[int] = []
    worker: Worker | None = None

    @app.task
    async def job(n: int) -> int:
        assert worker is not None and worker._loop is not None
        tasks_seen.append(sum(not task.done() for task in worker._loop.running))
        events.append(("start", n))
        await anyio.sleep(0.02)
        events.append(("end", n))
        return n

    async with app:
        # Given ten tasks in the queue
        results = [await job.delay(n) for n in range(10)]
        # When a worker with two slots (and room for eight unsettled) runs them
        async with Worker(app, concurrency=2) as worker:
            assert [await r.get(timeout=5) for r in results] == list(range(10))
    # Then they started in the order they were sent
    assert [n for what, n in events if what == "start"] == list(range(10))
    # And never more than two ran at once, nor had a task of their own while waiting
    assert _most_at_once(events) == 2 and max(tasks_seen) <= 2


@pytest.mark.parametrize(("shutdown_timeout", "runs_of_the_first"), [(5, 1), (0, 2)])
async def test_stopping_gives_back_the_messages_in_line(
    make_app: MakeApp, shutdown_timeout: float, runs_of_the_first: int
) -> None:
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job(n: int) -> int:
        ran.append(n)
        await anyio.sleep(0.2)
        return n

    async with app:
        # Given one task running and four in line for the single slot
        results = [await job.delay(n) for n in range(5)]
        async with Worker(
            app, concurrency=1, prefetch_multiplier=5, shutdown_timeout=shutdown_timeout
        ) as worker:
            await _until(lambda: worker.slots.statistics().waiting == 4)
        # When the worker stops (waiting for the running task, or not at all), then the line started nothing
        assert ran == [0]
        # And another worker runs each of those in line exactly once (and the first again if it was cut short)
        async with Worker(app, concurrency=2):
            assert [await r.get(timeout=5) for r in results] == list(range(5))
    assert sorted(ran) == [0] * runs_of_the_first + [1, 2, 3, 4]


async def test_rate_limited_and_unlimited_tasks_share_one_slot(make_app: MakeApp) -> None:
    app = make_app()
    events: list[tuple[str, int]] = []

    async def body(n: int) -> int:
        events.append(("start", n))
        await anyio.sleep(0.005)
        events.append(("end", n))
        return n

    @app.task(rate_limit="40/s")
    async def limited(n: int) -> int:
        return await body(n)

    @app.task(global_rate_limit="40/s")
    async def shared(n: int) -> int:
        return await body(n)

    @app.task
    async def free(n: int) -> int:
        return await body(n)

    async with app, Worker(app, concurrency=1):
        # When rate-limited and unlimited tasks arrive mixed, then every one completes, one at a time
        results = [task.delay(n) for n in range(6) for task in (limited, free, shared, free)]
        with anyio.fail_after(10):
            values = [await r.get(timeout=10) for r in results]
    assert values == [n for n in range(6) for _ in range(4)]
    assert _most_at_once(events) == 1


def _line(pool: dict[str, Any]) -> dict[str, Any]:
    return {key: pool[key] for key in ("limit", "borrowed", "waiting")}


async def test_inspect_reports_the_line_as_waiting(make_app: MakeApp) -> None:
    app = make_app()
    release = anyio.Event()

    @app.task
    async def job(n: int) -> int:
        await release.wait()
        return n

    async with app, Worker(app, concurrency=1, hostname="w-line") as worker:
        # Given one task running and three in line
        results = [job.delay(n) for n in range(4)]
        await _until(lambda: worker.slots.statistics().waiting == 3)
        # Then stats count the line as waiting, and active lists the running one only
        stats = (await app.control.inspect("stats", destination=["w-line"], timeout=5))[0]["w-line"]["ok"]
        assert _line(stats["pool"]) == {"limit": 1, "borrowed": 1, "waiting": 3} and stats["active"] == 1
        active = (await app.control.inspect("active", destination=["w-line"], timeout=5))[0]["w-line"]["ok"]
        assert [entry["id"] for entry in active] == [results[0].id]
        # And when they have all run, nothing is borrowed or waiting
        release.set()
        assert [await r.get(timeout=5) for r in results] == [0, 1, 2, 3]
        await _until(lambda: worker.slots.statistics().borrowed == 0)
        stats = (await app.control.inspect("stats", destination=["w-line"], timeout=5))[0]["w-line"]["ok"]
        assert _line(stats["pool"]) == {"limit": 1, "borrowed": 0, "waiting": 0} and stats["active"] == 0


async def test_an_acks_late_delivery_lost_while_in_line_is_not_run(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker whose deliveries of task 2 are lost with their connection (as on RabbitMQ)
    lost: set[str] = set()
    monkeypatch.setattr(_MemoryConsumer, "_lost", lambda self, delivery: delivery.id in lost)
    app = make_app(task_acks_late=True)
    ran: list[int] = []
    release = anyio.Event()

    ids: list[str] = []

    @app.task
    async def job(n: int) -> int:
        ran.append(n)
        if n == 1:
            await anyio.sleep(0.2)  # the other two are received meanwhile, and wait in line
            lost.add(ids[1])
            await release.wait()
        return n

    async with app:
        results = [await job.delay(n) for n in (1, 2, 3)]
        ids.extend(r.id for r in results)
        # When a worker with one slot runs the first while the other two wait in line, and the second is lost
        async with Worker(app, concurrency=1) as worker:
            with anyio.fail_after(5):
                while worker._loop is None or not ran:
                    await anyio.sleep(0.01)
            release.set()
            assert [await results[i].get(timeout=5) for i in (0, 2)] == [1, 3]
            # Then the lost one was not run, and it no longer counts against the prefetch window
            assert ran == [1, 3]
            assert worker._loop.consumer.held == {}
