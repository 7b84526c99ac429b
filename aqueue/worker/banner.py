"""The worker's start-up banner, a pure function of the app and the worker's options."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from aqueue.urls import mask_password

if TYPE_CHECKING:
    from aqueue.app import App

__all__ = ["banner"]


def banner(
    app: App,
    *,
    hostname: str,
    concurrency: int,
    queues: Sequence[str],
    processes: int | None = None,
    now: datetime | None = None,
    task_events: bool = False,
) -> str:
    """The text printed when a worker starts: app, masked URLs, concurrency, queues, tasks."""
    from aqueue import __version__

    when = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    app.conf.from_environment()  # the URLs may be given only by AQUEUE_* variables
    backend = app.conf.result_backend
    art = [
        f" -------------- {hostname} v{__version__}",
        "--- ***** -----",
        f"-- ******* ---- {platform.platform()} {when}",
        "- *** --- * ---",
        "- ** ---------- [config]",
        f"- ** ---------- .> app:         {app.main or '__main__'}:{id(app):#x}",
        f"- ** ---------- .> transport:   {mask_password(app.broker_url)}",
        f"- ** ---------- .> results:     {mask_password(backend) if backend else 'disabled://'}",
        f"- *** --- * --- .> concurrency: {_concurrency(concurrency, processes)}",
        f"-- ******* ---- .> task events: {'ON' if task_events else 'OFF (enable -E to monitor tasks in this worker)'}",
        "--- ***** -----",
        " -------------- [queues]",
        *(f"                .> {queue:<16} exchange={queue}(direct) key={queue}" for queue in queues),
        "",
        "[tasks]",
        *(f"  . {name}" for name in sorted(app.tasks)),
        "",
    ]
    return "\n".join(art)


def _concurrency(concurrency: int, processes: int | None) -> str:
    if processes is None:
        return f"{concurrency} (asyncio)"
    return f"{processes} process{'es' if processes > 1 else ''} x {concurrency} (asyncio)"
