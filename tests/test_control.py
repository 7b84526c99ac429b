"""Remote control, client side: broadcast to the app's workers and gather their replies in time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aqueue import App, states
from aqueue.broker.exchange import ExchangeMessage
from aqueue.control import Mailbox
from aqueue.exceptions import TaskRevokedError
from aqueue.worker import Worker

MakeApp = Callable[..., App]


def worker(app: App, name: str) -> Worker:
    return Worker(app, concurrency=2, hostname=name)


def merged(replies: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {name: reply for entry in replies for name, reply in entry.items()}


async def test_every_worker_replies_within_the_timeout(make_app: MakeApp) -> None:
    app = make_app()
    async with app, worker(app, "w1"), worker(app, "w2"):
        started = time.monotonic()
        replies = await app.control.ping(timeout=0.3)
        # Then each worker replied once, and gathering took about the timeout
        assert merged(replies) == {"w1": {"ok": "pong"}, "w2": {"ok": "pong"}}
        assert len(replies) == 2
        assert 0.25 <= time.monotonic() - started < 2


async def test_destination_limits_who_answers_and_returns_early(make_app: MakeApp) -> None:
    app = make_app()
    async with app, worker(app, "w1"), worker(app, "w2"):
        started = time.monotonic()
        replies = await app.control.ping(destination=["w2"], timeout=5)
        assert replies == [{"w2": {"ok": "pong"}}]
        assert time.monotonic() - started < 2


async def test_no_worker_means_no_reply(make_app: MakeApp) -> None:
    app = make_app()
    async with app:
        with anyio.fail_after(2):
            assert await app.control.ping(timeout=0.2) == []


async def test_rate_limit_sets_and_removes_a_tasks_rate(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, worker(app, "w1") as running:
        bucket = running.runtimes["tasks.add"].bucket
        ok = [{"w1": {"ok": "new rate limit set successfully"}}]
        assert await app.control.rate_limit("tasks.add", "10/m", destination=["w1"]) == ok
        assert str(bucket.rate) == "10/m"
        assert await app.control.rate_limit("tasks.add", "0", destination=["w1"]) == ok
        assert bucket.rate is None


async def test_rate_limit_of_an_unknown_task_is_an_error_reply(make_app: MakeApp) -> None:
    app = make_app()
    async with app, worker(app, "w1"):
        replies = await app.control.rate_limit("tasks.nope", "1/s", destination=["w1"])
    assert replies == [{"w1": {"error": "unknown task 'tasks.nope'"}}]


async def test_revoke_stops_a_task_that_has_not_started(make_app: MakeApp) -> None:
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job() -> None:
        ran.append(1)

    async with app:
        # Given a task waiting for its countdown
        result = await job.apply_async(countdown=0.3)
        async with worker(app, "w1"):
            # When it is revoked
            replies = await app.control.revoke(result.id, destination=["w1"])
            assert replies == [{"w1": {"ok": f"tasks {result.id} flagged as revoked"}}]
            # Then it is not run, and is REVOKED
            with pytest.raises(TaskRevokedError):
                await result.get(timeout=5)
    assert result.state == states.REVOKED
    assert ran == []


async def test_inspect_registered_active_and_stats(make_app: MakeApp) -> None:
    app = make_app()
    release = anyio.Event()

    @app.task(name="tasks.slow")
    async def slow(n: int) -> None:
        await release.wait()

    async with app, worker(app, "w1"):
        assert await app.control.inspect("registered", destination=["w1"]) == [{"w1": {"ok": ["tasks.slow"]}}]
        result = slow.delay(5)

        async def running() -> list[Any]:
            active = await app.control.inspect("active", destination=["w1"])
            return list(active[0]["w1"]["ok"])

        with anyio.fail_after(5):
            while not (tasks := await running()):
                await anyio.sleep(0.02)
        assert [(t["id"], t["name"], t["args"]) for t in tasks] == [(result.id, "tasks.slow", [5])]
        stats = (await app.control.inspect("stats", destination=["w1"]))[0]["w1"]["ok"]
        assert stats["active"] == 1 and stats["pool"]["limit"] == 2
        release.set()
        await result.get(timeout=5)


async def test_without_reply_nothing_is_gathered_but_the_command_runs(make_app: MakeApp) -> None:
    app = make_app()
    async with app, worker(app, "w1") as running:
        with anyio.fail_after(1):
            assert await app.control.revoke("some-id", reply=False) == []
        with anyio.fail_after(5):
            while "some-id" not in running.state.revoked:
                await anyio.sleep(0.01)


async def test_unknown_command_and_bad_messages_do_not_stop_the_worker(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    async with app, worker(app, "w1"):
        # Given a control message that is not JSON
        await app.broker.send_to_exchange(Mailbox.of(app.conf).exchange, ExchangeMessage(b"\xffnot json"))
        # Then an unknown command gets an error reply, and the worker still answers
        assert await app.control.broadcast("shutdown_now", destination=["w1"]) == [
            {"w1": {"error": "unknown command 'shutdown_now'"}}
        ]
        assert await app.control.ping(destination=["w1"]) == [{"w1": {"ok": "pong"}}]
    assert "Ignoring a bad control message" in caplog.text


async def test_concurrent_broadcasts_each_get_their_own_replies(make_app: MakeApp) -> None:
    app = make_app()
    results: list[Any] = [None, None]

    async def ask(i: int, command: str) -> None:
        results[i] = await app.control.broadcast(command, destination=["w1"])

    async with app, worker(app, "w1"), anyio.create_task_group() as group:
        group.start_soon(ask, 0, "ping")
        group.start_soon(ask, 1, "registered")
    assert results == [[{"w1": {"ok": "pong"}}], [{"w1": {"ok": []}}]]
