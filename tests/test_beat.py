"""Beat: beat_schedule and add_periodic_task, and what is sent when, at chosen moments, on memory://.

Ticks are given their moment (``beat.tick(now)``), so first starts, downtime, restarts and several beats
at once are exact; the last tests run beat on the real clock with a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from aqueue import App, chain
from aqueue.beat import Beat, parse_schedule
from aqueue.exceptions import ImproperlyConfigured, InvalidSchedule
from aqueue.message import Message, decode_message
from aqueue.schedules import crontab, schedule
from aqueue.testing import running_worker

Factory = Callable[..., App]


async def sent(app: App, queue: str | None = None) -> list[Message]:
    """The messages waiting in ``queue`` (default: the app's), taken off it."""
    out: list[Message] = []
    async with app.broker.consume([queue or app.conf.task_default_queue], prefetch=1000) as consumer:
        while True:
            with anyio.move_on_after(0.05):
                delivery = await consumer.receive()
                out.append(
                    decode_message(delivery.body, delivery.content_type, frozenset({delivery.content_type}))
                )
                await delivery.ack()
                continue
            return out


@pytest.fixture
async def beats() -> AsyncIterator[Callable[[App], Any]]:
    """Started beats, stopped afterwards."""
    started: list[Beat] = []

    async def start(app: App) -> Beat:
        beat = Beat(app)
        await beat.start()
        started.append(beat)
        return beat

    yield start
    for beat in started:
        await beat.stop()


def every_10s(**entry: Any) -> dict[str, Any]:
    return {"tick": {"task": "tasks.add", "schedule": 10.0, "args": (2, 2), **entry}}


# beat_schedule and add_periodic_task -----------------------------------------------------------


def test_beat_schedule_takes_celery_entries(make_app: Factory) -> None:
    app = make_app(
        beat_schedule={
            "add-every-30s": {"task": "tasks.add", "schedule": 30.0, "args": (16, 16)},
            "nightly": {
                "task": "tasks.report",
                "schedule": crontab(hour=3, minute=0),
                "kwargs": {"full": True},
                "options": {"queue": "reports", "expires": 60},
            },
            "hourly": {"task": "tasks.ping", "schedule": timedelta(hours=1), "relative": True},
        }
    )
    entries = {entry.name: entry for entry in parse_schedule(app.conf.beat_schedule)}
    assert entries["add-every-30s"].schedule == schedule(30) and entries["add-every-30s"].args == (16, 16)
    assert entries["nightly"].kwargs == {"full": True} and entries["nightly"].options["queue"] == "reports"
    assert entries["hourly"].schedule == schedule(3600)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"task": "tasks.add"}, "needs 'schedule'"),
        ({"schedule": 10}, "needs 'task'"),
        ({"task": "tasks.add", "schedule": "often"}, "Invalid schedule 'often'"),
        ({"task": "tasks.add", "schedule": -5}, "Invalid schedule -5"),
        ({"task": "tasks.add", "schedule": 10, "arg": (1,)}, "unknown key 'arg'"),
        ({"task": "tasks.add", "schedule": 10, "args": "12"}, "'args' must be a list or tuple"),
        ({"task": "tasks.add", "schedule": 10, "options": {"queues": "x"}}, "unknown option 'queues'"),
    ],
)
def test_a_bad_entry_is_refused_where_it_is_set(make_app: Factory, entry: dict[str, Any], says: str) -> None:
    app = make_app()
    # When a beat_schedule entry cannot be used; Then setting it fails, naming the entry and the fault
    with pytest.raises(ImproperlyConfigured) as caught:
        app.conf.beat_schedule = {"my-entry": entry}
    assert "'my-entry'" in str(caught.value) and says in str(caught.value)


def test_add_periodic_task_takes_signatures_tasks_and_names(make_app: Factory) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    # A signature as Celery's signature dicts carry it (task, args, kwargs, options)
    signature = {"task": "tasks.add", "args": (2,), "kwargs": {}, "options": {"queue": "math"}}
    key = app.add_periodic_task(10.0, signature, args=(1,), priority=3)
    assert key == "tasks.add(1, 2)"
    assert app.conf.beat_schedule[key] == {
        "task": "tasks.add",
        "schedule": 10.0,
        "args": (1, 2),
        "kwargs": {},
        "options": {"queue": "math", "priority": 3},
    }
    # An immutable signature keeps its own arguments
    frozen = {**signature, "immutable": True}
    assert app.add_periodic_task(5, frozen, args=(9,), name="frozen") == "frozen"
    assert app.conf.beat_schedule["frozen"]["args"] == (2,)
    # A task, or a task name
    assert app.add_periodic_task(crontab(minute=0), add, kwargs={"x": 1, "y": 2}) == "tasks.add(x=1, y=2)"
    assert app.add_periodic_task(60, "tasks.other", name="other") == "other"
    with pytest.raises(InvalidSchedule, match=r"takes a signature \(add.s\(2, 2\)\)"):
        app.add_periodic_task(60, 42)
    with pytest.raises(InvalidSchedule, match="Invalid schedule"):
        app.add_periodic_task("soon", "tasks.other")


def test_an_unnamed_entry_shadowing_another_is_warned_about(
    make_app: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    app.add_periodic_task(10, "tasks.add")
    with caplog.at_level(logging.WARNING, "aqueue.beat"):
        app.add_periodic_task(20, "tasks.add")
    assert "shadowed a previous unnamed periodic task" in caplog.text


async def test_on_after_configure_receivers_add_entries_once_at_start(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    app = make_app()
    calls: list[Any] = []

    @app.on_after_configure.connect
    def setup_periodic_tasks(sender: App, **kwargs: Any) -> None:
        calls.append(sender)
        sender.add_periodic_task(10.0, {"task": "tasks.add", "args": (2, 2)}, name="add every 10")

    @app.on_after_finalize.connect
    def broken(sender: App, **kwargs: Any) -> None:
        raise RuntimeError("a receiver that fails is logged; the others still run")

    first: Beat = await beats(app)
    second: Beat = await beats(app)
    assert calls == [app]
    assert [slot.entry.name for slot in first.slots] == [slot.entry.name for slot in second.slots]
    assert [slot.entry.name for slot in first.slots] == ["add every 10"]


# What is sent, and when -------------------------------------------------------------------------


async def test_a_first_start_waits_for_the_next_due_time(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    app = make_app(beat_schedule=every_10s())
    beat = await beats(app)
    # Given a beat starting at 1005 with an entry due every 10 s, never run before
    assert await beat.tick(1005.0) == 1010.0
    # Then nothing is sent at start, and the entry runs at 1010, once however often beat looks
    assert await sent(app) == []
    await beat.tick(1010.0)
    await beat.tick(1010.0)
    assert await beat.tick(1012.0) == 1020.0
    (message,) = await sent(app)
    assert (message.task, list(message.args)) == ("tasks.add", [2, 2])
    assert message.id == str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "aqueue.beat"), "tick@1010.0"))


async def test_two_beats_send_each_due_time_once(make_app: Factory, beats: Callable[[App], Any]) -> None:
    # Given two beats on one broker, started at the same moment
    one, other = make_app(beat_schedule=every_10s()), make_app(beat_schedule=every_10s())
    first, second = await beats(one), await beats(other)
    await asyncio.gather(first.tick(1000.5), second.tick(1000.5))
    # When both look at the schedule at every due time, in turn and at once
    for moment in (1010.0, 1020.0, 1030.0):
        await asyncio.gather(first.tick(moment), second.tick(moment))
    await second.tick(1040.1)
    await first.tick(1040.2)
    # Then each due time was sent once, by one of them
    ids = [m.id for m in await sent(one)]
    assert len(ids) == len(set(ids)) == 4


async def test_a_restart_sends_the_latest_missed_run_once_and_never_a_sent_one_again(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    app = make_app(beat_schedule=every_10s())
    before = await beats(app)
    await before.tick(1000.5)
    await before.tick(1010.0)
    # Given a beat that sent the run due at 1010 and stopped
    assert len(await sent(app)) == 1
    await before.stop()
    # When it starts again within the same period, it sends nothing
    again = await beats(app)
    await again.tick(1015.0)
    assert await sent(app) == []
    await again.stop()
    # When it starts after missing the runs due at 1020 ... 1100
    later = await beats(app)
    assert await later.tick(1105.0) == 1110.0
    # Then it sends the latest of them, 1100, at once, and only that one
    (caught_up,) = await sent(app)
    assert caught_up.id == later.slots[0].entry.task_id(1100.0)


async def test_a_missed_crontab_run_past_the_starting_deadline_is_dropped(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    nightly = {"nightly": {"task": "tasks.report", "schedule": crontab(minute=0, hour=3)}}
    app = make_app(beat_schedule=nightly, beat_cron_starting_deadline=3600)
    night = datetime(2024, 5, 1, 3, 0, tzinfo=UTC).timestamp()
    beat = await beats(app)
    await beat.tick(night - 60)
    await beat.tick(night)
    assert len(await sent(app)) == 1
    # Given the next night's run missed by more than the deadline; Then it is not sent late
    await beat.tick(night + 86400 + 7200)
    assert await sent(app) == []
    # And the run after is sent as usual
    await beat.tick(night + 2 * 86400)
    assert len(await sent(app)) == 1


async def test_crontab_entries_run_in_the_apps_time_zone(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    morning = {"morning": {"task": "tasks.report", "schedule": crontab(minute=30, hour=7)}}
    app = make_app(beat_schedule=morning, timezone="Europe/Oslo")
    beat = await beats(app)
    assert (
        await beat.tick(datetime(2024, 6, 1, tzinfo=UTC).timestamp())
        == datetime(2024, 6, 1, 5, 30, tzinfo=UTC).timestamp()
    )


def test_the_zone_is_celerys_app_timezone(make_app: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # timezone if set (whatever enable_utc says), else UTC, else (enable_utc off) the local zone
    assert make_app(timezone="Europe/Oslo").conf.app_timezone() == ZoneInfo("Europe/Oslo")
    assert make_app().conf.app_timezone() is UTC
    monkeypatch.setenv("TZ", "America/New_York")
    assert make_app(enable_utc=False).conf.app_timezone() == ZoneInfo("America/New_York")


async def test_options_args_and_kwargs_reach_the_message(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    entry = every_10s(kwargs={"label": "x"}, options={"queue": "periodic", "expires": 5})
    app = make_app(beat_schedule=entry)
    beat = await beats(app)
    await beat.tick(1000.5)
    await beat.tick(1010.0)
    (message,) = await sent(app, "periodic")
    assert (list(message.args), message.kwargs) == ([2, 2], {"label": "x"})
    assert message.expires is not None and 0 < message.expires - time.time() <= 5


async def test_an_entrys_options_act_as_on_apply_async(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    # Given an entry with queue, priority, expires and countdown, as Celery's 'options'
    options = {"queue": "periodic", "priority": 7, "expires": 60, "countdown": 0.3}
    app = make_app(beat_schedule=every_10s(options=options))
    beat = await beats(app)
    await beat.tick(1000.5)
    before = time.time()
    await beat.tick(1010.0)
    # Then the countdown holds the task back, and the message carries each option
    assert await sent(app, "periodic") == []
    await asyncio.sleep(0.4)
    (message,) = await sent(app, "periodic")
    assert message.priority == 7 and message.id == beat.slots[0].entry.task_id(1010.0)
    assert message.eta is not None and before + 0.3 <= message.eta <= time.time()
    assert message.expires is not None and before + 60 <= message.expires <= time.time() + 60


async def test_add_periodic_task_sends_the_signature_as_it_is(
    make_app: Factory, beats: Callable[[App], Any]
) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    # Given an immutable signature with options, and a chain with options of its own
    app.add_periodic_task(10.0, add.si(2, 2).set(queue="math", priority=5), args=(9,), name="frozen")
    app.add_periodic_task(10.0, chain(add.s(1, 1), add.s(2)).set(priority=3), name="flow")
    assert app.conf.beat_schedule["flow"]["subtask_type"] == "chain"
    beat = await beats(app)
    await beat.tick(1000.5)
    await beat.tick(1010.0)
    entries = {slot.entry.name: slot.entry for slot in beat.slots}
    # Then the signature's options and arguments arrive (the partial argument 9 is not added)
    (frozen,) = await sent(app, "math")
    assert (frozen.task, list(frozen.args), frozen.priority) == ("tasks.add", [2, 2], 5)
    assert frozen.id == entries["frozen"].task_id(1010.0)
    # And the chain is sent as a chain: its first step, carrying the next, whose id is the run's
    (first,) = await sent(app)
    assert (first.task, list(first.args), first.priority) == ("tasks.add", [1, 1], 3)
    assert first.chain is not None and len(first.chain) == 1
    assert first.chain[0]["options"]["task_id"] == entries["flow"].task_id(1010.0)
    # And a second due time is sent with ids of its own
    await beat.tick(1020.0)
    (again,) = await sent(app)
    assert again.id != first.id and again.chain is not None
    assert again.chain[0]["options"]["task_id"] == entries["flow"].task_id(1020.0)


async def test_a_periodic_chain_runs_to_its_end(make_app: Factory, beats: Callable[[App], Any]) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    app.add_periodic_task(10.0, add.s(1, 1) | add.s(2) | add.s(3), name="flow")
    beat = await beats(app)
    await beat.tick(1000.5)
    # When beat sends the chain to a worker; Then the run's id is the chain's result
    async with running_worker(app):
        await beat.tick(1010.0)
        result = app.AsyncResult(beat.slots[0].entry.task_id(1010.0))
        assert await result.get(timeout=10) == 7


async def test_a_broker_that_fails_is_tried_again_later(
    make_app: Factory, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    # Given a beat whose SQLite file cannot be created
    (tmp_path / "file").write_text("")
    app = make_app(broker=f"sqlite:///{tmp_path}/file/q.db", beat_schedule=every_10s())
    beat = Beat(app)
    await beat.start()
    try:
        # When it looks at the schedule; Then it logs the failure and looks again soon, not at the due time
        with caplog.at_level(logging.WARNING, "aqueue.beat"):
            assert await beat.tick(1000.0) == 1000.5
            assert await beat.tick(1000.5) == 1001.5
        assert "cannot keep the mark of tick" in caplog.text
    finally:
        await beat.stop()


# On the real clock --------------------------------------------------------------------------------


async def test_beat_sends_on_schedule_to_a_worker(make_app: Factory) -> None:
    app = make_app()
    runs: list[float] = []

    @app.task
    async def record() -> None:
        runs.append(time.time())

    app.conf.beat_schedule = {"often": {"task": record.name, "schedule": 0.2}}
    # Given a worker and a beat sending every 0.2 s (as worker -B runs them)
    async with running_worker(app), Beat(app):
        with anyio.fail_after(10):
            while len(runs) < 4:
                await asyncio.sleep(0.05)
    # Then they did not come faster than the schedule (four runs span three periods at least)
    assert runs[-1] - runs[0] > 0.3, runs


async def test_run_returns_when_asked_to_stop(make_app: Factory) -> None:
    beat = Beat(make_app(beat_schedule=every_10s()))
    runner = asyncio.create_task(beat.run())
    await asyncio.sleep(0.1)
    beat.request_stop()
    with anyio.fail_after(5):
        await runner
    assert beat.marks is None
