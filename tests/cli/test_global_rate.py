"""global_rate_limit: one token bucket for the whole fleet, with two real worker processes."""

from __future__ import annotations

import anyio
import pytest

from .conftest import Project

pytestmark = pytest.mark.slow

TICK = """

@app.task(global_rate_limit="10/s")
async def tick(path):
    import os, time
    with open(path, "a") as f:
        f.write(f"{time.time()} {os.getpid()}\\n")
"""
TASKS = 30


async def test_global_rate_limit_holds_across_two_workers(project: Project) -> None:
    # Given two worker processes (each holding few messages, so both get work) and a task limited to
    # 10/s across the fleet
    project.write_tasks(extra=TICK)
    first = await project.start_worker("-c", "2", "--prefetch-multiplier", "1", "-n", "w1@test")
    second = await project.start_worker("-c", "2", "--prefetch-multiplier", "1", "-n", "w2@test")
    log = project.root / "ticks.txt"
    # When many are sent at once
    async with project.app() as client:
        for _ in range(TASKS):
            client.send_task("tasks.tick", [str(log)])
        await client.publisher.drain()
        with anyio.fail_after(30):
            while len(log.read_text().splitlines() if log.exists() else []) < TASKS:
                await anyio.sleep(0.1)
    rows = [line.split() for line in log.read_text().splitlines()]
    times = sorted(float(t) for t, _ in rows)
    # Then both workers ran some, yet no second saw more than 10 starts (plus the bucket's first token)
    assert len({pid for _, pid in rows}) == 2
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 11, busiest
    # And the whole run took as long as 10/s allows, not the 20/s two per-worker limits would
    assert times[-1] - times[0] >= (TASKS - 1) / 10 - 0.3
    await first.stop()
    await second.stop()
