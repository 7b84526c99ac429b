"""The consumer loop: bad messages are logged with their id, dead-lettered, never run; good ones start."""

from __future__ import annotations

import logging
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from aqueue import App, states
from aqueue.exceptions import NotRegistered
from aqueue.message import Envelope, Message, encode_message
from aqueue.serialization import get_serializer
from aqueue.worker import Worker

MakeApp = Callable[..., App]


async def dead_ids(app: App) -> list[str]:
    return [e.id for e in await app.broker.dead_letters(app.conf.task_default_queue)]


async def run_worker_until_dead(app: App, count: int) -> None:
    async with Worker(app):
        with anyio.fail_after(5):
            while len(await dead_ids(app)) < count:
                await anyio.sleep(0.01)


def _create(path: str) -> None:
    Path(path).touch()


class _Trap:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_create, (str(self.path),))


@pytest.mark.parametrize(
    ("body", "content_type", "kind"),
    [
        (b"\xff\xfe garbage", "application/json", "undecodable"),
        (b"[1, 2, 3]", "application/json", "undecodable"),
        (b"\x81\xa2id\x01", "application/x-msgpack", "refused"),
        (b"<xml/>", "application/xml", "refused"),
    ],
)
async def test_bad_messages_are_dead_lettered_and_logged_with_their_id(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, body: bytes, content_type: str, kind: str
) -> None:
    app = make_app()
    bad_id = str(uuid.uuid4())
    async with app:
        await app.broker.publish([Envelope(bad_id, app.conf.task_default_queue, body, content_type)])
        await run_worker_until_dead(app, 1)
    assert await dead_ids(app) == [bad_id]
    assert f"Rejecting {kind} message {bad_id}" in caplog.text
    assert "not run" in caplog.text


async def test_a_pickle_is_refused_without_being_loaded(
    make_app: MakeApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a pickle that would create a file when loaded, in a task message's place
    app = make_app()
    trap = tmp_path / "loaded"
    body = pickle.dumps(_Trap(trap))
    async with app:
        await app.broker.publish(
            [Envelope("pickled", app.conf.task_default_queue, body, "application/x-python-serialize")]
        )
        await run_worker_until_dead(app, 1)
    # Then it was refused by its content type and never unpickled
    assert not trap.exists()
    assert "Rejecting refused message pickled" in caplog.text
    assert "accept_content" in caplog.text


async def test_pickle_runs_when_accept_content_names_it(make_app: MakeApp) -> None:
    app = make_app(task_serializer="pickle", accept_content=["json", "pickle"])

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, Worker(app):
        assert await add.delay(4, 4).get(timeout=5) == 8


async def test_an_unregistered_task_is_dead_lettered_and_recorded_as_failed(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    async with app:
        result = await app.send_task("tasks.unknown", args=[1])
        await run_worker_until_dead(app, 1)
        # Then it failed with NotRegistered, which says what to do
        with pytest.raises(NotRegistered, match=r"tasks\.unknown"):
            await result.get(timeout=5)
    assert result.state == states.FAILURE
    assert await dead_ids(app) == [result.id]
    assert f"Received unregistered task of type 'tasks.unknown' (id {result.id})" in caplog.text
    assert "Did you import the module" in caplog.text


async def test_the_unregistered_error_is_logged_at_the_default_level(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = make_app()
    async with app:
        result = await app.send_task("tasks.unknown")
        await run_worker_until_dead(app, 1)
    assert any(r.levelno >= logging.WARNING and result.id in r.getMessage() for r in caplog.records)


async def test_a_good_message_published_by_hand_runs(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    message = Message("by-hand", "tasks.add", [2, 3])
    codec = get_serializer("msgpack")
    body = encode_message(message, codec)
    app.conf.accept_content = ["json", "msgpack"]
    async with app:
        await app.broker.publish([Envelope("by-hand", app.conf.task_default_queue, body, codec.content_type)])
        async with Worker(app):
            assert await app.AsyncResult("by-hand").get(timeout=5) == 5
