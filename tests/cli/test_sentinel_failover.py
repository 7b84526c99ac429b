"""A Sentinel failover under load: 2,000 acks-late tasks through a real worker while the master moves."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from aqueue import App
from aqueue.exceptions import OperationalError
from tests.redis_servers import SentinelSet, sentinel_set

from .conftest import Project

pytestmark = pytest.mark.slow

TASKS = 2000
MARK_TASK = '''

@app.task
async def mark(n, path):
    """Appends 'n start end' to ``path``: one line per run."""
    start = time.time()
    await asyncio.sleep(0.05)
    with open(path, "a") as f:
        f.write(f"{n} {start} {time.time()}\\n")
    return n
'''


@pytest.fixture
async def sentinels(tmp_path: Path) -> AsyncIterator[SentinelSet]:
    async with sentinel_set(tmp_path / "servers") as deployment:
        yield deployment


async def publish_until(app: App, stop: asyncio.Event, marks: Path, published: list[int]) -> int:
    """Publish tasks numbered from TASKS on, one every 5 ms, until ``stop``; the number refused.

    A publish that fails (after the app's retries) is counted, not recorded: only those confirmed must run.
    """
    refused = 0
    for n in range(TASKS, 2 * TASKS):
        if stop.is_set():
            break
        try:
            await app.send_task("tasks.mark", [n, str(marks)])
        except OperationalError:
            refused += 1
        else:
            published.append(n)
        await asyncio.sleep(0.005)
    return refused


def runs(path: Path) -> list[tuple[int, float, float]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [
        (int(n), float(s), float(e)) for n, s, e in (line.split() for line in lines if line.count(" ") == 2)
    ]


async def test_a_failover_under_load_loses_no_task(sentinels: SentinelSet, tmp_path: Path) -> None:
    # Given a worker running acks-late tasks from the Sentinel-managed master
    root = tmp_path / "project"
    root.mkdir()
    project = Project(root, "redis", redis_url=sentinels.url().removesuffix("/0"))
    options = dict(sentinels.options)
    project.write_tasks(
        MARK_TASK,
        task_acks_late=True,
        broker_transport_options=options,
        result_backend_transport_options=options,
    )
    marks = root / "marks.txt"
    try:
        await project.start_worker("-c", "10")
        async with project.app() as app:
            with anyio.fail_after(60):
                results = [app.send_task("tasks.mark", [n, str(marks)]) for n in range(TASKS)]
                await asyncio.gather(*results)
            # When the master fails over while they run
            while len(runs(marks)) < 100:
                await anyio.sleep(0.02)
            # (and a client keeps publishing through it)
            published: list[int] = []
            stop = asyncio.Event()
            producer = asyncio.create_task(publish_until(app, stop, marks, published))
            started = time.time()
            await sentinels.failover(follow=False)
            settled = time.time()
            await asyncio.sleep(0.5)
            stop.set()
            refused = await asyncio.wait_for(producer, 60)
            during = len(runs(marks))
            assert during < TASKS, (
                f"the tasks were all done before the failover completed ({settled - started:.1f} s)"
            )
            # Then every task runs at least once, those published during the failover included
            expected = set(range(TASKS)) | set(published)
            with anyio.fail_after(120):
                while not expected <= {n for n, _, _ in runs(marks)}:
                    await anyio.sleep(0.1)
            # And a task ran twice only when its first run was under way during the failover
            seen = runs(marks)
            counts = Counter(n for n, _, _ in seen)
            first = {n: (s, e) for n, s, e in reversed(seen)}
            twice = sorted(n for n, c in counts.items() if c > 1)
            for n in twice:
                start, end = first[n]
                assert end >= started - 1 and start <= settled + 1, (n, start, end, started, settled)
            # And every result can be read
            with anyio.fail_after(60):
                values = [await r.get(timeout=30) for r in results]
            assert values == list(range(TASKS))
            print(
                f"\nfailover took {settled - started:.2f} s; {during} of {TASKS} done by then; "
                f"{len(twice)} ran twice; {len(published)} published during it ({refused} refused); "
                f"worker log warnings: {project.workers[0].log.count('WARNING')}"
            )
    finally:
        project.close()
