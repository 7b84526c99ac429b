"""A test's broker with an aqueue app on it and a Celery app module beside, for Celery's tools and Flower."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aqueue import App
from tests.conftest import Transport, transport_for

from .celery_side import aqueue_settings, celery_settings, delete_amqp_exchanges, write_celery_app
from .scenario import define_tasks

MakeApp = Callable[..., App]


@dataclass
class Side:
    """A test's transport, an aqueue app on it, and a folder with a matching Celery app."""

    transport: Transport
    app: App
    folder: Path
    unique: str


@pytest.fixture(params=["redis", "amqp"])
async def side(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str, make_app: MakeApp
) -> AsyncIterator[Side]:
    async with transport_for(request.param, tmp_path, unique) as transport:
        app = make_app(transport, task_send_sent_event=True, **aqueue_settings(transport, unique))
        define_tasks(app)
        write_celery_app(tmp_path, celery_settings(transport, unique))
        try:
            yield Side(transport, app, tmp_path, unique)
        finally:
            await app.aclose()
            if transport.kind == "amqp":
                await delete_amqp_exchanges(unique)
