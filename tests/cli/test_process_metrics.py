"""``worker --processes N --metrics-port PORT``: one /metrics adding up every worker process, on Redis.

The children are real worker processes; the endpoint is read with prometheus_client's own parser.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.monitoring.celery_side import free_port
from tests.worker.test_metrics import by_task, scrape

from .conftest import Project, open_project
from .test_processes import WHERE, children_of, runs, start_processes, until

pytestmark = pytest.mark.slow

HOLD = '''


@app.task
async def hold(folder, release):
    """Runs until the file ``release`` exists (60 s at most); leaves a start file in ``folder``."""
    Path(folder, f"hold.start.{os.getpid()}").touch()
    for _ in range(600):
        if Path(release).exists():
            return os.getpid()
        await asyncio.sleep(0.1)
'''

Samples = dict[Any, float]


@pytest.fixture
async def project(tmp_path: Path) -> AsyncIterator[Project]:
    async with open_project(tmp_path, "redis") as project:
        yield project


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


async def scrape_until(url: str, ready: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    """Scrape ``url`` until ``ready`` says yes; fail showing the aqueue samples on timeout."""
    samples: Samples = {}
    with anyio.move_on_after(timeout):
        while not ready(samples := await scrape(url)):
            await anyio.sleep(0.1)
        return samples
    pytest.fail(
        f"/metrics not as expected within {timeout}s: {[i for i in samples.items() if 'aqueue' in i[0][0]]}"
    )


def gauges(samples: Samples) -> tuple[float, float]:
    """(active, prefetched) of the whole worker."""
    return samples[("aqueue_tasks_active", ())], samples[("aqueue_tasks_prefetched", ())]


def multiproc_dir(pid: int) -> Path:
    """The metrics folder a child was given by its parent."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [found] = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(found.decode())


def file_owners(folder: Path) -> set[str]:
    """Whose files the metrics folder holds: pids, and "archive"."""
    return {path.stem.rsplit("_", 1)[1] for path in folder.glob("*.db")}


async def test_one_endpoint_adds_up_both_processes_and_survives_a_kill(
    project: Project, folder: Path
) -> None:
    # Given: two processes of one slot, holding two messages each (acks_late: the running one counts),
    # and one /metrics served by the parent
    project.write_tasks(
        WHERE + HOLD,
        task_acks_late=True,
        worker_metrics_address="127.0.0.1",
        broker_transport_options={"visibility_timeout": 300},
    )
    port = free_port()
    parent = await start_processes(
        project, "--processes", "2", "-c", "1", "--prefetch-multiplier", "2", "--metrics-port", str(port)
    )
    url = f"http://127.0.0.1:{port}/metrics"
    assert f"Serving Prometheus metrics on {url}" in parent.log
    children = children_of(parent.pid)
    metrics_dir = multiproc_dir(min(children))
    assert metrics_dir.is_dir() and {multiproc_dir(pid) for pid in children} == {metrics_dir}

    async with project.app() as client:
        # When: twelve tasks run, in both processes
        results = [await client.send_task("tasks.where", [i, 0.2, str(folder)]) for i in range(12)]
        assert {await r.get(timeout=30) for r in results} == children

        # Then: the endpoint counts all twelve once, and nothing is active or waiting
        samples = await scrape_until(
            url, lambda s: by_task(s, "aqueue_tasks_succeeded_total", "tasks.where") >= 12
        )
        assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.where") == 12
        assert by_task(samples, "aqueue_tasks_received_total", "tasks.where") == 12
        assert by_task(samples, "aqueue_task_runtime_seconds_count", "tasks.where") == 12
        assert 12 * 0.2 <= by_task(samples, "aqueue_task_runtime_seconds_sum", "tasks.where") < 12 * 2
        samples = await scrape_until(url, lambda s: gauges(s) == (0, 0))

        # When: four tasks block (each process runs one and holds one waiting for its slot)
        release = project.root / "release"
        for _ in range(4):
            await client.send_task("tasks.hold", [str(folder), str(release)])
        await until(lambda: len(runs(folder, "start").get("hold", [])) == 2)

        # Then: the gauges add up both processes
        await scrape_until(url, lambda s: gauges(s) == (2, 2), timeout=10)

        # When: one of them is killed outright and replaced
        victim = runs(folder, "start")["hold"][0]
        os.kill(victim, signal.SIGKILL)
        await parent.wait_for(f"pid:{victim} exited with 'signal 9 (SIGKILL)'; starting a new one")
        await until(lambda: parent.log.count(" ready.") >= 3)

        # Then: what it counted stays, and its gauges are gone
        samples = await scrape_until(url, lambda s: gauges(s) == (1, 1), timeout=10)
        assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.where") == 12
        assert by_task(samples, "aqueue_tasks_received_total", "tasks.hold") == 4

        # And: once released, the survivor's two tasks are counted on top (the victim's two wait out the
        # visibility timeout)
        release.touch()
        samples = await scrape_until(
            url,
            lambda s: by_task(s, "aqueue_tasks_succeeded_total", "tasks.hold") == 2 and gauges(s) == (0, 0),
        )
        assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.where") == 12

    # When: the worker stops, the parent removes the metrics folder
    assert await parent.stop(signal.SIGTERM, timeout=30) == 0, parent.log
    assert not metrics_dir.exists()


async def test_counts_add_up_across_recycled_processes(project: Project, folder: Path) -> None:
    # Given: two processes replaced after four tasks each, metrics on by the setting
    port = free_port()
    project.write_tasks(WHERE, worker_metrics_address="127.0.0.1", worker_metrics_port=port)
    parent = await start_processes(project, "--processes", "2", "-c", "2", "--max-tasks-per-child", "4")
    url = f"http://127.0.0.1:{port}/metrics"
    metrics_dir = multiproc_dir(min(children_of(parent.pid)))

    async with project.app() as client:
        # When: 24 tasks run, in at least six processes one after the other
        results = [await client.send_task("tasks.where", [i, 0.05, str(folder)]) for i in range(24)]
        pids = [await r.get(timeout=90) for r in results]
    assert len(set(pids)) >= 6 and "(recycled)" in parent.log

    # Then: the endpoint still counts every one of them, once; and the gone processes hold no gauge
    samples = await scrape_until(url, lambda s: gauges(s) == (0, 0))
    assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.where") == 24
    assert by_task(samples, "aqueue_tasks_received_total", "tasks.where") == 24
    assert by_task(samples, "aqueue_task_runtime_seconds_count", "tasks.where") == 24

    # And: the files of the gone processes were folded into one archive per type, and removed
    await until(lambda: file_owners(metrics_dir) <= {"archive", *map(str, children_of(parent.pid))})
    assert {p.name for p in metrics_dir.glob("*_archive.db")} == {
        "counter_archive.db",
        "histogram_archive.db",
    }
    samples = await scrape(url)
    assert by_task(samples, "aqueue_tasks_succeeded_total", "tasks.where") == 24
    assert samples[("aqueue_task_runtime_seconds_bucket", (("le", "+Inf"), ("task", "tasks.where")))] == 24
    assert await parent.stop(signal.SIGTERM, timeout=30) == 0, parent.log


async def test_a_metrics_port_in_use_stops_the_worker_before_any_process_starts(project: Project) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        project.write_tasks(worker_metrics_address="127.0.0.1")
        parent = project.spawn_worker("--processes", "2", "--metrics-port", str(port))
        code = await parent.wait(timeout=30)
    assert code != 0
    assert f"Cannot serve metrics on 127.0.0.1:{port}" in parent.log
    assert "--metrics-port (worker_metrics_port)" in parent.log
    assert "Process 'Worker-" not in parent.log and " ready." not in parent.log
