"""The embedded store with a worker in another process: round trips are woken, not polled."""

from __future__ import annotations

import anyio

from aqueue.result.sqlite import SQLiteBackend

from .conftest import Project


async def test_round_trips_to_a_worker_process_are_woken_not_polled(sqlite_project: Project) -> None:
    # Given a worker that would look at its queue only once an hour, and a client whose result wait
    # would read again only once an hour
    sqlite_project.write_tasks(broker_transport_options={"polling_interval": 3600})
    await sqlite_project.start_worker()
    async with sqlite_project.app() as client:
        assert isinstance(client.backend, SQLiteBackend)
        client.backend.wakeup_fallback = 3600
        # When the client sends tasks one after the other, each once the last one's result is in
        with anyio.fail_after(30):
            results = [await (await client.send_task("tasks.add", [i, i])).get() for i in range(5)]
    # Then every round trip completes: the worker was woken by each publish, the client by each result
    assert results == [0, 2, 4, 6, 8]
