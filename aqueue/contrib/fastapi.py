"""FastAPI: open the app's connections in the lifespan, optionally run a worker there, and a dependency.

::

    from fastapi import FastAPI
    from aqueue.contrib.fastapi import AqueueApp, lifespan

    api = FastAPI(lifespan=lifespan(app, worker=True, concurrency=50))

    @api.post("/add")
    async def add_view(x: int, y: int, aqueue: AqueueApp):
        result = await add.delay(x, y)
        return {"id": result.id}

The lifespan opens the broker and backend connections at start-up and closes them at shutdown. With
``worker=True`` a :class:`~aqueue.worker.Worker` runs inside the web process, starting with the server
and stopping gracefully with it. Pass your own lifespan as ``lifespan=`` and it runs inside ours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

try:
    from fastapi import Depends, FastAPI, Request
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aqueue.contrib.fastapi needs FastAPI: pip install 'aqueue[fastapi]'") from exc

from aqueue.app import App
from aqueue.worker import Worker

__all__ = ["AqueueApp", "get_app", "lifespan"]

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def lifespan(
    app: App,
    *,
    worker: bool = False,
    concurrency: int | None = None,
    queues: Sequence[str] | None = None,
    shutdown_timeout: float | None = None,
    lifespan: Lifespan | None = None,
) -> Lifespan:
    """A FastAPI lifespan that opens ``app`` (and runs a worker when ``worker`` is true).

    Parameters:
        app: the aqueue app; handlers get it through :data:`AqueueApp`.
        worker: run a worker in this process for as long as the server runs.
        concurrency, queues, shutdown_timeout: the embedded worker's options.
        lifespan: your own lifespan, run inside this one; the state it yields is passed on.
    """

    @asynccontextmanager
    async def run(api: FastAPI) -> AsyncIterator[Mapping[str, Any] | None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(app)
            if worker:
                await stack.enter_async_context(
                    Worker(app, concurrency=concurrency, queues=queues, shutdown_timeout=shutdown_timeout)
                )
            api.state.aqueue_app = app
            state = await stack.enter_async_context(lifespan(api)) if lifespan is not None else None
            yield state

    return run


def get_app(request: Request) -> App:
    """The dependency behind :data:`AqueueApp`: the app opened by :func:`lifespan`."""
    app = getattr(request.app.state, "aqueue_app", None)
    if not isinstance(app, App):
        raise RuntimeError("No aqueue app: create FastAPI(lifespan=aqueue.contrib.fastapi.lifespan(app)).")
    return app


AqueueApp = Annotated[App, Depends(get_app)]
"""Declare a handler parameter ``aqueue: AqueueApp`` to receive the app."""
