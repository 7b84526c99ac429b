"""The worker's lifecycle: options, concurrency and prefetch, run/stop, graceful shutdown, statedb."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from aqueue import App, states
from aqueue.exceptions import OperationalError
from aqueue.worker import Worker
from aqueue.worker.state import WorkerState
from aqueue.worker.worker import default_hostname

MakeApp = Callable[..., App]


def test_defaults_come_from_the_settings(make_app: MakeApp) -> None:
    app = make_app(worker_concurrency=7, worker_prefetch_multiplier=3, worker_shutdown_timeout=2.5)
    worker = Worker(app)
    assert (worker.concurrency, worker.prefetch, worker.shutdown_timeout) == (7, 21, 2.5)
    assert worker.queues == [app.conf.task_default_queue]
    assert worker.hostname == default_hostname() == f"aqueue@{socket.gethostname()}"
    # And arguments win over settings
    worker = Worker(
        app, concurrency=2, prefetch_multiplier=1, queues=["a", "b"], hostname="w1", shutdown_timeout=0
    )
    assert (worker.concurrency, worker.prefetch, worker.queues, worker.hostname) == (2, 2, ["a", "b"], "w1")
    assert worker.shutdown_timeout == 0


async def test_at_most_concurrency_tasks_run_at_once(make_app: MakeApp) -> None:
    app = make_app()
    running, peak = 0, 0

    @app.task
    async def job() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.05)
        running -= 1

    async with app, Worker(app, concurrency=2):
        results = [job.delay() for _ in range(6)]
        for result in results:
            await result.get(timeout=5)
    assert peak == 2


async def test_unacknowledged_messages_stay_within_the_prefetch_window(make_app: MakeApp) -> None:
    app = make_app()
    release = anyio.Event()

    @app.task(acks_late=True)
    async def job() -> None:
        await release.wait()

    async with app, Worker(app, concurrency=1, prefetch_multiplier=3) as worker:
        results = [await job.delay() for _ in range(6)]
        assert worker._loop is not None
        held = worker._loop.consumer.held
        with anyio.fail_after(5):
            while len(held) < 3:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert len(held) == 3
        release.set()
        for result in results:
            await result.get(timeout=5)


async def test_several_queues_are_consumed(make_app: MakeApp, unique: str) -> None:
    app = make_app()

    @app.task
    async def where(n: int) -> int:
        return n

    async with app, Worker(app, queues=[f"a-{unique}", f"b-{unique}"]):
        a = where.apply_async((1,), queue=f"a-{unique}")
        b = where.apply_async((2,), queue=f"b-{unique}")
        assert [await a.get(timeout=5), await b.get(timeout=5)] == [1, 2]


async def test_run_until_request_stop(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aqueue")
    app = make_app()

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    worker = Worker(app, hostname="runner")
    async with app, anyio.create_task_group() as group:
        group.start_soon(worker.run)
        assert await add.delay(1, 2).get(timeout=5) == 3
        # When a stop is requested (as the signal handlers do), then run() returns
        worker.request_stop()
        with anyio.fail_after(5):
            while worker._stack is not None:
                await anyio.sleep(0.01)
    assert "runner ready." in caplog.text and "runner stopped." in caplog.text


async def test_stop_before_start_and_twice_is_harmless(make_app: MakeApp) -> None:
    app = make_app()
    worker = Worker(app)
    await worker.stop()
    async with app:
        await worker.start()
        await worker.stop()
        await worker.stop()


async def test_shutdown_does_not_start_waiting_tasks(make_app: MakeApp) -> None:
    # Given one running task and three received but waiting for the single slot
    app = make_app()
    ran: list[int] = []
    started = anyio.Event()

    @app.task
    async def job(n: int) -> int:
        ran.append(n)
        started.set()
        await anyio.sleep(0.3)
        return n

    async with app:
        worker = Worker(app, concurrency=1, shutdown_timeout=5)
        async with worker:
            results = [job.delay(n) for n in range(4)]
            with anyio.fail_after(5):
                await started.wait()
            began = time.monotonic()
        # When the worker stops, then it finishes the running task only, without waiting for the rest
        assert ran == [0]
        assert time.monotonic() - began < 0.9  # running all four would take 1.2 s
        # And the others are back in the queue for the next worker
        async with Worker(app, concurrency=4):
            assert [await r.get(timeout=5) for r in results] == [0, 1, 2, 3]
    assert sorted(ran) == [0, 1, 2, 3]


async def test_a_task_waiting_for_its_rate_limit_does_not_delay_shutdown(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(rate_limit="1/m")
    async def job(n: int) -> int:
        return n

    async with app:
        async with Worker(app, shutdown_timeout=10):
            first, second = job.delay(1), job.delay(2)
            assert await first.get(timeout=5) == 1
            await anyio.sleep(0.05)
            began = time.monotonic()
        assert time.monotonic() - began < 1
        # And the waiting task runs on the next worker (whose bucket starts full)
        async with Worker(app):
            assert await second.get(timeout=5) == 2


async def test_revoked_ids_survive_a_restart_with_statedb(make_app: MakeApp, tmp_path: Path) -> None:
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job() -> None:
        ran.append(1)

    statedb = str(tmp_path / "worker.state")
    async with app:
        async with Worker(app, statedb=statedb, hostname="w1"):
            assert await app.control.revoke("doomed-id", destination=["w1"]) != []
        # When a new worker starts with the same state file, then the revoked task is not run
        async with Worker(app, statedb=statedb):
            result = job.apply_async(task_id="doomed-id")
            with anyio.fail_after(5):
                while await result.refresh() != states.REVOKED:
                    await anyio.sleep(0.02)
    assert ran == []


def test_an_unreadable_statedb_is_ignored_with_a_warning(
    make_app: MakeApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    statedb = tmp_path / "worker.state"
    statedb.write_text("not json")
    worker = Worker(make_app(), statedb=str(statedb))
    assert worker.state.revoked == set()
    assert "Ignoring unreadable state file" in caplog.text


async def test_start_gives_up_after_the_connection_retries(make_app: MakeApp, tmp_path: Path) -> None:
    # Given a broker that cannot be opened and one retry allowed
    blocker = tmp_path / "file"
    blocker.write_text("")
    app = make_app(broker=f"sqlite:///{blocker}/q.db", broker_connection_max_retries=1)
    # When the worker starts, then it retries once and raises
    with anyio.fail_after(5), pytest.raises(OperationalError):
        await Worker(app).start()


def test_statistics(make_app: MakeApp) -> None:
    stats = Worker(make_app(), concurrency=3).statistics()
    assert stats["pool"].limit == 3 and stats["state"].active == 0


@pytest.fixture
def broken_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory:// consumers that break down as soon as they fetch."""
    from aqueue.broker.memory import _MemoryConsumer

    async def broken(self: object, n: int) -> list[object]:
        raise OperationalError("the broker went away")

    monkeypatch.setattr(_MemoryConsumer, "_fetch", broken)


@pytest.mark.usefixtures("broken_consumer")
async def test_a_failing_consumer_stops_the_worker_and_run_raises_it(make_app: MakeApp) -> None:
    # Given a broker whose consumer breaks down
    app = make_app()
    # When the worker runs; Then it stops by itself and run() raises what broke, so a CLI exits non-zero
    with anyio.fail_after(5), pytest.raises(OperationalError, match="went away"):
        await Worker(app).run()


@pytest.mark.usefixtures("broken_consumer")
async def test_async_with_raises_a_part_failure_on_exit(make_app: MakeApp) -> None:
    app = make_app()
    with anyio.fail_after(5), pytest.raises(OperationalError):
        async with Worker(app) as worker:
            while worker.failure is None:
                await anyio.sleep(0.01)


async def test_max_tasks_runs_that_many_then_stops_leaving_the_rest_queued(make_app: MakeApp) -> None:
    # Given: five tasks waiting and a worker with one slot that may take three
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job(i: int) -> int:
        await anyio.sleep(0.01)
        ran.append(i)
        return i

    async with app:
        results = [await job.delay(i) for i in range(5)]

        # When it runs
        with anyio.fail_after(5):
            await Worker(app, concurrency=1, max_tasks=3).run()

        # Then: it ran exactly three, those waiting for its slot included, and stopped by itself
        assert sorted(ran) == [0, 1, 2]
        # And: the others were never taken: the next worker runs them
        async with Worker(app):
            assert [await r.get(timeout=5) for r in results] == [0, 1, 2, 3, 4]
    assert sorted(ran) == [0, 1, 2, 3, 4]


async def test_retire_lets_running_tasks_finish_past_the_grace_period(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: a worker with a 0.05 s grace period running a 0.3 s task
    app = make_app()
    started = anyio.Event()

    @app.task
    async def job() -> str:
        started.set()
        await anyio.sleep(0.3)
        return "done"

    caplog.set_level(logging.INFO, "aqueue.worker")
    async with app:
        worker = Worker(app, shutdown_timeout=0.05, hostname="w1")
        result = job.delay()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await started.wait()

                # When: it retires
                worker.retire("testing")
                second = await job.delay()

        # Then: the task ran to the end, and the worker stopped without taking the next one
        assert await result.get(timeout=1) == "done"
        assert await second.refresh() == states.PENDING
    assert "w1: testing; taking no more work" in caplog.text


async def test_a_worker_answers_control_addressed_to_an_alias(make_app: MakeApp) -> None:
    app = make_app()
    async with app:
        worker = Worker(app, hostname="w1-1@host")
        worker.aliases = frozenset({"w1@host"})
        async with worker:
            replies = await app.control.ping(destination=["w1@host"], timeout=2)
    assert replies == [{"w1-1@host": {"ok": "pong"}}]


def test_processes_sharing_a_statedb_keep_each_others_revoked_ids(tmp_path: Path) -> None:
    # Given: two workers' states on one file
    statedb = tmp_path / "worker.state"
    first, second = WorkerState(statedb), WorkerState(statedb)

    # When: each revokes a different task
    first.revoke(["a"])
    second.revoke(["b"])

    # Then: the file keeps both, and a new state reads both
    assert WorkerState(statedb).revoked == {"a", "b"}
    first.load()
    assert first.revoked == {"a", "b"}
