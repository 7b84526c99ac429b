"""SPEC section 7, the canvas, row by row, with an in-process worker on every transport.

Transports as in the tour: memory, sqlite, redis, amqp (rpc:// results) and amqp with Redis results.
Chords need a backend that keeps the join, so on amqp with rpc:// they are refused (tested here too).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import aqueue
from aqueue import App, chain, chord, group, signature, states
from aqueue.canvas import Signature
from aqueue.exceptions import ChordError, ImproperlyConfigured
from aqueue.result.groupresult import GroupResult
from tests.conftest import Transport
from tests.test_tour import WAIT, transport, worker  # noqa: F401  (the transport fixture)

MakeApp = Callable[..., App]


class CanvasError(Exception):
    """A task's own exception, importable from here."""


class Tasks:
    """The tasks these tests use, registered on one app; ``calls`` records what ran, in order."""

    def __init__(self, app: App) -> None:
        self.app, self.calls = app, list[tuple[str, Any]]()
        calls = self.calls

        @app.task(name="tasks.add")
        async def add(x: int, y: int) -> int:
            calls.append(("add", (x, y)))
            return x + y

        @app.task(name="tasks.tsum")
        async def tsum(numbers: list[int]) -> int:
            calls.append(("tsum", numbers))
            return sum(numbers)

        @app.task(name="tasks.fail")
        async def fail(*args: Any) -> None:
            calls.append(("fail", args))
            raise CanvasError("boom")

        @app.task(name="tasks.record")
        def record(*args: Any) -> str:
            calls.append(("record", args))
            return "recorded"

        @app.task(name="tasks.record_id")
        def record_id(task_id: str) -> None:
            calls.append(("record_id", task_id))

        @app.task(name="tasks.on_error")
        def on_error(request: Any, exc: BaseException, traceback: str | None) -> None:
            calls.append(("on_error", (request.id, type(exc).__name__, str(exc), bool(traceback))))

        self.add, self.tsum, self.fail, self.record, self.on_error = add, tsum, fail, record, on_error
        self.record_id = record_id

    def ran(self, name: str) -> list[Any]:
        return [args for called, args in self.calls if called == name]


@pytest.fixture
def app(make_app: MakeApp, transport: Transport) -> App:  # noqa: F811
    return make_app(transport)


@pytest.fixture
def t(app: App) -> Tasks:
    return Tasks(app)


def _keeps_chords(app: App) -> bool:
    return app.backend.supports_chords


# Rows: signatures ---------------------------------------------------------------------------------


async def test_signatures_send_with_partial_arguments_and_options(app: App, t: Tasks) -> None:
    async with worker(app):
        assert await t.add.s(2, 2).delay().get(timeout=WAIT) == 4
        # partial args go first, as in Celery
        assert await t.add.s(2).delay(3).get(timeout=WAIT) == 5
        # si ignores partial arguments
        assert await t.add.si(2, 2).delay(100).get(timeout=WAIT) == 4
        assert await signature("tasks.add", args=(2, 2), app=app).delay().get(timeout=WAIT) == 4
        assert await t.add.signature((1, 1), countdown=0.05).apply_async().get(timeout=WAIT) == 2
        # clone and set do not change the original
        base = t.add.s(1)
        assert await base.clone((9,)).set(priority=1).delay().get(timeout=WAIT) == 10
        assert base.args == (1,) and "priority" not in base.options


def test_a_signature_is_plain_data_rebuilt_by_kind(app: App, t: Tasks) -> None:
    # Given a workflow turned into plain data and back
    flow = chain(t.add.s(1, 1), group(t.add.s(1), t.add.s(2)), t.tsum.s())
    data = dict(flow)
    rebuilt = signature(data, app=app)
    # Then the same kinds come back, as Celery lays them out
    assert isinstance(rebuilt, chain) and data["subtask_type"] == "chain"
    assert isinstance(rebuilt.tasks[1], group) and isinstance(rebuilt.tasks[1].tasks[0], Signature)
    assert dict(t.add.s(2, 2)) == {
        "task": "tasks.add",
        "args": (2, 2),
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }
    assert repr(t.add.si(2, 2)) == "tasks.add(2, 2)!"


def test_the_package_exports_the_canvas() -> None:
    assert aqueue.chain is chain and aqueue.group is group and aqueue.chord is chord
    assert aqueue.signature is signature


# Rows: chains -------------------------------------------------------------------------------------


async def test_a_chain_passes_each_result_on(app: App, t: Tasks) -> None:
    async with worker(app):
        result = await chain(t.add.s(2, 2), t.add.s(4), t.add.s(8)).apply_async()
        assert await result.get(timeout=WAIT) == 16
        assert result.parent is not None and await result.parent.get(timeout=WAIT) == 8
        assert await (t.add.s(1, 1) | t.add.s(1) | t.add.si(5, 5)).delay().get(timeout=WAIT) == 10
    assert t.ran("add")[-1] == (5, 5)  # si: the result before was not added


async def test_a_failed_step_stops_the_chain_and_get_raises_its_exception(app: App, t: Tasks) -> None:
    async with worker(app):
        result = chain(t.add.s(1, 1), t.fail.s(), t.record.s()).delay()
        with pytest.raises(CanvasError, match="boom"):
            await result.get(timeout=WAIT)
        assert result.state == states.FAILURE
        await asyncio.sleep(0.2)
    assert t.ran("record") == []


async def test_a_group_then_a_task_in_a_chain_is_a_chord(app: App, t: Tasks) -> None:
    if not _keeps_chords(app):
        pytest.skip("rpc:// keeps no chord joins (refusal tested below)")
    async with worker(app):
        flow = chain(t.add.s(1, 1), group(t.add.s(10), t.add.s(20)), t.tsum.s(), t.add.s(1000))
        assert await flow.delay().get(timeout=WAIT) == (12 + 22) + 1000


# Rows: groups -------------------------------------------------------------------------------------


async def test_a_group_gives_a_group_result_in_order(app: App, t: Tasks) -> None:
    async with worker(app, concurrency=8):
        result = group(t.add.s(i, i) for i in range(10)).delay()
        assert isinstance(result, GroupResult) and len(result.results) == 10
        await result
        assert await result.get(timeout=WAIT) == [i + i for i in range(10)]
        assert await result.ready() and await result.successful() and not await result.failed()
        assert await result.completed_count() == 10
        assert result.id and all(r.id for r in result.results)
        failing = group(t.add.s(1, 1), t.fail.s()).delay()
        with pytest.raises(CanvasError):
            await failing.get(timeout=WAIT)
        assert await failing.failed() and await failing.completed_count() == 1


# Rows: chords -------------------------------------------------------------------------------------


async def test_a_chord_calls_back_once_with_the_results_in_order(app: App, t: Tasks) -> None:
    if not _keeps_chords(app):
        with pytest.raises(ImproperlyConfigured, match="Redis or SQLite"):
            chord(t.add.s(i, i) for i in range(3))(t.tsum.s())
        return
    async with worker(app, concurrency=8):
        result = chord(t.add.s(i, i) for i in range(10))(t.tsum.s())
        assert await result.get(timeout=WAIT) == 90
        assert isinstance(result.parent, GroupResult)
        assert await result.parent.get(timeout=WAIT) == [i + i for i in range(10)]
        assert await (group(t.add.s(1, 1), t.add.s(2, 2)) | t.tsum.s()).delay().get(timeout=WAIT) == 6
        assert await chord([t.add.s(3, 3)], t.tsum.s()).delay().get(timeout=WAIT) == 6
        assert await chord([], t.tsum.s()).delay().get(timeout=WAIT) == 0
    assert t.ran("tsum") == [[i + i for i in range(10)], [2, 4], [6], []]


async def test_a_failed_header_task_fails_the_chord_callback(app: App, t: Tasks) -> None:
    if not _keeps_chords(app):
        pytest.skip("rpc:// keeps no chord joins")
    async with worker(app, concurrency=8):
        result = chord([t.add.s(1, 1), t.fail.s(), t.add.s(2, 2)], t.tsum.s()).delay()
        # get() raises the header task's exception, as Celery's does through the result's parent
        with pytest.raises(CanvasError, match="boom"):
            await result.get(timeout=WAIT)
        failed = result.parent.results[1] if isinstance(result.parent, GroupResult) else None
        assert failed is not None
        # and the callback's own state is FAILURE with ChordError naming the task
        own = await app.AsyncResult(result.id).get(timeout=WAIT, propagate=False)
        assert isinstance(own, ChordError) and failed.id in str(own) and "boom" in str(own)
    assert t.ran("tsum") == []


async def test_a_header_task_reported_twice_counts_once(app: App, t: Tasks) -> None:
    # Given a chord whose first header task is sent a second time, with the same id and place
    if not _keeps_chords(app):
        pytest.skip("rpc:// keeps no chord joins")
    async with worker(app, concurrency=8):
        result = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()).delay()
        await result
        assert isinstance(result.parent, GroupResult)
        first = result.parent.results[0]
        callback = {**dict(t.tsum.s().set(task_id=result.id)), "chord_size": 2}
        t.add.apply_async((1, 1), task_id=first.id, group_id=result.parent.id, group_index=0, chord=callback)
        assert await result.get(timeout=WAIT) == 6
        await asyncio.sleep(0.3)
    # Then the callback ran once
    assert t.ran("tsum") == [[2, 4]]


# Rows: link, link_error ---------------------------------------------------------------------------


async def test_link_sends_the_result_and_link_error_calls_err_request_exc_traceback(
    app: App, t: Tasks
) -> None:
    async with worker(app):
        done = t.add.apply_async((2, 3), link=t.record.s("after"))
        assert await done.get(timeout=WAIT) == 5
        failed = t.fail.apply_async(link_error=t.on_error.s())
        with pytest.raises(CanvasError):
            await failed.get(timeout=WAIT)
        immutable = t.fail.apply_async(link_error=t.record.si("errback-si"))
        with pytest.raises(CanvasError):
            await immutable.get(timeout=WAIT)
        one_arg = t.fail.apply_async(link_error=t.record_id.s())  # one argument: the failed task's id
        with pytest.raises(CanvasError):
            await one_arg.get(timeout=WAIT)
        for _ in range(100):
            if len(t.ran("record")) >= 2 and t.ran("on_error") and t.ran("record_id"):
                break
            await asyncio.sleep(0.05)
    assert (5, "after") in t.ran("record")
    assert t.ran("on_error") == [(failed.id, "CanvasError", "boom", True)]
    assert ("errback-si",) in t.ran("record") and t.ran("record_id") == [one_arg.id]


# Callbacks on workflows, placed as Celery 5.7 places them ----------------------------------------


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for ``condition``, then a little more so that a second call would show."""
    for _ in range(200):
        if condition():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


async def test_link_on_a_chain_goes_on_its_last_task(app: App, t: Tasks) -> None:
    async with worker(app):
        # Given link given to apply_async, and link() on the chain itself
        result = chain(t.add.s(1, 1), t.add.s(10)).apply_async(link=t.record.s("option"))
        flow = chain(t.add.s(2, 2), t.add.s(20))
        flow.link(t.record.s("method"))
        other = flow.delay()
        assert await result.get(timeout=WAIT) == 12 and await other.get(timeout=WAIT) == 24
        await until(lambda: len(t.ran("record")) >= 2)
    # Then each is called once, with the last step's result (not after the first step)
    assert sorted(t.ran("record")) == [(12, "option"), (24, "method")]


async def test_link_error_on_a_chain_goes_on_every_task(app: App, t: Tasks) -> None:
    async with worker(app):
        # Given a chain whose second step fails, and one whose first step fails
        second = chain(t.add.s(1, 1), t.fail.s(), t.record.s()).apply_async(link_error=t.on_error.s())
        first = chain(t.fail.s(), t.add.s(1)).on_error(t.on_error.s()).delay()
        for result in (second, first):
            with pytest.raises(CanvasError):
                await result.get(timeout=WAIT)
        assert second.parent is not None and first.parent is not None
        await until(lambda: len(t.ran("on_error")) >= 2)
    # Then the errback is called once for each, with the request of the step that failed
    assert sorted(t.ran("on_error")) == sorted(
        [(second.parent.id, "CanvasError", "boom", True), (first.parent.id, "CanvasError", "boom", True)]
    )
    assert t.ran("record") == []


async def test_link_on_a_chord_goes_on_its_callback(app: App, t: Tasks) -> None:
    if not _keeps_chords(app):
        pytest.skip("rpc:// keeps no chord joins")
    async with worker(app, concurrency=8):
        # Given link on a chord, given to apply_async and with link(), and a chain ending in a chord
        result = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()).apply_async(link=t.record.s("option"))
        linked = chord([t.add.s(3, 3)], t.tsum.s())
        linked.link(t.record.s("method"))
        other = linked.delay()
        ending = chain(t.add.s(0, 1), group(t.add.s(1), t.add.s(2)), t.tsum.s()).apply_async(
            link=t.record.s("chain")
        )
        assert await result.get(timeout=WAIT) == 6 and await other.get(timeout=WAIT) == 6
        assert await ending.get(timeout=WAIT) == 5
        await until(lambda: len(t.ran("record")) >= 3)
    # Then each is called once, after the callback, with its result (never after a header task)
    assert sorted(t.ran("record")) == [(5, "chain"), (6, "method"), (6, "option")]


async def test_link_error_on_a_chord_goes_on_its_callback(app: App, t: Tasks) -> None:
    if not _keeps_chords(app):
        pytest.skip("rpc:// keeps no chord joins")
    async with worker(app, concurrency=8):
        # Given a chord with link_error whose header fails, and one whose callback fails
        header = chord([t.add.s(1, 1), t.fail.s()], t.tsum.s()).apply_async(link_error=t.on_error.s())
        body = chord([t.add.s(1, 1)], t.fail.s()).on_error(t.on_error.s()).delay()
        for result in (header, body):
            with pytest.raises(CanvasError):
                await result.get(timeout=WAIT)
        await until(lambda: len(t.ran("on_error")) >= 2)
    # Then the errback is called once for each, with the callback's request: never for the header task
    # (as Celery's task_allow_error_cb_on_chord_header=False, its default)
    called = {task_id: (kind, message, traceback) for task_id, kind, message, traceback in t.ran("on_error")}
    assert len(t.ran("on_error")) == 2 and called.keys() == {header.id, body.id}
    assert called[header.id][0] == "ChordError" and "boom" in called[header.id][1]
    assert called[body.id] == ("CanvasError", "boom", True)


async def test_a_group_refuses_link_options_and_places_link_methods_as_celery(app: App, t: Tasks) -> None:
    # Given link options on a group: refused, as Celery refuses them
    with pytest.raises(TypeError, match="use a chord"):
        group(t.add.s(1, 1)).apply_async(link=t.record.s())
    with pytest.raises(TypeError, match="on each task"):
        group(t.add.s(1, 1)).apply_async(link_error=t.on_error.s())
    async with worker(app):
        # When link() and link_error() are called on groups
        flow = group(t.add.s(1, 1), t.add.s(2, 2))
        flow.link(t.record.s("first"))
        failing = group(t.fail.s(), t.fail.s())
        failing.link_error(t.on_error.s())
        assert await flow.delay().get(timeout=WAIT) == [2, 4]
        failed = failing.delay()
        await until(lambda: len(t.ran("on_error")) >= 2 and len(t.ran("record")) >= 1)
    # Then the callback ran once, immutable (on the first member), and the errback once per member
    assert t.ran("record") == [("first",)]
    assert sorted(row[0] for row in t.ran("on_error")) == sorted(r.id for r in failed.results)


# Rows: map, starmap, chunks -----------------------------------------------------------------------


async def test_map_starmap_and_chunks(app: App, t: Tasks) -> None:
    async with worker(app):
        assert await t.tsum.map([[1, 2], [3, 4]]).delay().get(timeout=WAIT) == [3, 7]
        assert await t.add.starmap([(1, 2), (3, 4)]).delay().get(timeout=WAIT) == [3, 7]
        chunked = t.add.chunks(zip(range(10), range(10), strict=True), 3).delay()
        assert isinstance(chunked, GroupResult)
        assert await chunked.get(timeout=WAIT) == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]


# Size -------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_chain_and_a_chord_of_a_thousand(app: App, t: Tasks) -> None:
    async with worker(app, concurrency=100):
        long_chain = chain([t.add.s(0, 1)] + [t.add.s(1) for _ in range(999)]).delay()
        assert await long_chain.get(timeout=120) == 1000
        if _keeps_chords(app):
            wide = chord(t.add.s(i, 1) for i in range(1000))(t.tsum.s())
            assert await wide.get(timeout=120) == sum(range(1, 1001))
            assert len(t.ran("tsum")) == 1


def test_a_chord_needs_a_callback(app: App, t: Tasks) -> None:
    with pytest.raises(ImproperlyConfigured, match="callback"):
        chord([t.add.s(1, 1)]).apply_async()


def test_a_workflow_takes_signatures(app: App, t: Tasks) -> None:
    with pytest.raises(ImproperlyConfigured, match="signatures"):
        chain(t.add.s(1, 1), "tasks.add")
    assert uuid.UUID(str(t.add.s(1, 1).freeze().id))
