"""The worker's remote-control commands beyond the basic ones: events on and off, conf, mingle, matching."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from aqueue import App
from aqueue.events import EventReceiver
from aqueue.worker import Worker
from aqueue.worker.control import COMMANDS
from tests.conftest import transport_for

MakeApp = Callable[..., App]


def answer(replies: list[dict[str, dict[str, Any]]], name: str) -> Any:
    [reply] = replies
    return reply[name]


async def test_enable_and_disable_task_events(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, Worker(app, hostname="w1") as worker, EventReceiver(app.broker).events() as events:
        # Given a worker started without -E: nothing is sent
        assert worker.monitoring.events is None
        # When events are enabled from remote, it says so, goes online, and sends task events
        assert answer(await app.control.enable_events(destination=["w1"]), "w1") == {
            "ok": "task events enabled"
        }
        assert answer(await app.control.enable_events(destination=["w1"]), "w1") == {
            "ok": "task events already enabled"
        }
        await app.send_task("tasks.add", [1, 2])
        with anyio.fail_after(5):
            kinds = [(await anext(events))["type"] for _ in range(4)]
        assert kinds == ["worker-online", "task-received", "task-started", "task-succeeded"]
        # When they are disabled, task events stop (worker events go on)
        assert answer(await app.control.disable_events(destination=["w1"]), "w1") == {
            "ok": "task events disabled"
        }
        await (await app.send_task("tasks.add", [1, 2])).get(timeout=5)
        assert answer(await app.control.broadcast("heartbeat", destination=["w1"]), "w1") == {"ok": None}
        with anyio.fail_after(5):
            assert (await anext(events))["type"] == "worker-heartbeat"


async def test_conf_shows_changed_settings_without_secrets(make_app: MakeApp) -> None:
    app = make_app(broker_transport_options={"password": "s3cret", "visibility_timeout": 60})
    async with app, Worker(app, hostname="w1") as worker:
        conf = await COMMANDS["conf"](worker, {})
        everything = await COMMANDS["conf"](worker, {"with_defaults": True})
    assert conf["broker_transport_options"] == {"password": "********", "visibility_timeout": 60}
    assert conf["task_default_queue"] == app.conf.task_default_queue and "worker_concurrency" not in conf
    assert everything["worker_concurrency"] == 100
    masked = await _conf_with(make_app, broker="redis://:pw@127.0.0.1:6379/0")
    assert masked["broker_url"] == "redis://:**@127.0.0.1:6379/0"


async def _conf_with(make_app: MakeApp, **settings: Any) -> dict[str, Any]:
    app = make_app(**settings)
    worker = Worker(app, hostname="w1")
    result: dict[str, Any] = await COMMANDS["conf"](worker, {})
    return result


async def test_mingle_hello_merges_revoked_ids(make_app: MakeApp) -> None:
    app = make_app()
    async with app, Worker(app, hostname="w1") as worker:
        worker.state.revoke(["mine"])
        # A starting Celery worker sends its revoked ids and gets ours
        reply = await COMMANDS["hello"](worker, {"from_node": "celery@x", "revoked": ["theirs"]})
        assert reply["revoked"] == ["mine", "theirs"] and isinstance(reply["clock"], int)
        assert await COMMANDS["hello"](worker, {"from_node": "w1"}) is None


async def test_time_limit_registered_reserved_and_query_task(make_app: MakeApp) -> None:
    app = make_app()
    release = anyio.Event()

    @app.task(name="tasks.wait", rate_limit="100/s")
    async def wait() -> None:
        await release.wait()

    async with app, Worker(app, concurrency=1, hostname="w1", shutdown_timeout=1) as worker:
        ok = await app.control.broadcast(
            "time_limit", {"task_name": "tasks.wait", "hard": 30}, destination=["w1"]
        )
        assert answer(ok, "w1") == {"ok": "time limits set successfully"}
        assert worker.runtimes["tasks.wait"].time_limit == 30.0
        registered = answer(await app.control.inspect("registered", destination=["w1"]), "w1")
        assert registered == {"ok": ["tasks.wait [rate_limit=100/s]"]}
        # Given one running and one waiting for the slot
        running, waiting = app.send_task("tasks.wait"), app.send_task("tasks.wait")
        with anyio.fail_after(5):
            while not worker.slots.queued():
                await anyio.sleep(0.01)
        reserved = answer(await app.control.inspect("reserved", destination=["w1"]), "w1")["ok"]
        assert [r["id"] for r in reserved] == [waiting.id] and reserved[0]["time_start"] is None
        found = await COMMANDS["query_task"](worker, {"ids": [running.id, waiting.id]})
        assert list(found) == [running.id] and found[running.id][0] == "active"
        release.set()
        await waiting.get(timeout=5)


async def test_workers_are_picked_by_pattern(make_app: MakeApp) -> None:
    app = make_app()
    async with app, Worker(app, hostname="web@a"), Worker(app, hostname="batch@b"):
        glob = await app.control.broadcast("ping", pattern="web@*", timeout=0.5)
        pcre = await app.control.broadcast("ping", pattern="^batch", matcher="pcre", timeout=0.5)
    assert glob == [{"web@a": {"ok": "pong"}}] and pcre == [{"batch@b": {"ok": "pong"}}]


async def test_a_failing_command_replies_an_error(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(worker: Worker, arguments: dict[str, Any]) -> Any:
        raise RuntimeError("no luck")

    monkeypatch.setitem(COMMANDS, "broken", broken)
    app = make_app()
    async with app, Worker(app, hostname="w1"):
        assert await app.control.broadcast("broken", destination=["w1"]) == [
            {"w1": {"error": "RuntimeError('no luck')"}}
        ]
        assert await app.control.ping(destination=["w1"]) == [{"w1": {"ok": "pong"}}]
    assert "Remote control command broken failed" in caplog.text


async def test_shutdown_from_remote_stops_the_worker(make_app: MakeApp) -> None:
    app = make_app()
    async with app:
        worker = Worker(app, hostname="w1")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(worker.run)
                with anyio.fail_after(5):
                    while worker._loop is None:
                        await anyio.sleep(0.01)
                await anyio.sleep(0.1)
                assert await app.control.broadcast("shutdown", destination=["w1"]) == [
                    {"w1": {"ok": "shutting down"}}
                ]


async def test_two_workers_of_one_name_on_rabbitmq(
    tmp_path: Path, unique: str, make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two workers of one name: RabbitMQ lets only one read the name's mailbox (as for Celery)
    async with transport_for("amqp", tmp_path, unique) as transport:
        app, other = make_app(transport), make_app(transport)  # two connections, as two processes
        async with app, other, Worker(app, hostname="twin"), Worker(other, hostname="twin"):
            # Then the second says why it takes no commands, and both run; the first answers
            assert "Remote control is off for twin" in caplog.text and "-n NAME" in caplog.text
            assert await app.control.ping(timeout=0.5) == [{"twin": {"ok": "pong"}}]
