"""The embedded stores: SQLite with a worker in another process, and memory:// in one process.

    python benchmarks/embedded.py                          # every job, median of 3 runs
    python benchmarks/embedded.py --n 2000 --trips 300 --runs 1
    python benchmarks/embedded.py --checkouts /path/to/old,/path/to/new   # before/after, interleaved

Jobs (each in a fresh process, with the aqueue of the checkout first on PYTHONPATH; on uvloop when it
can be imported, as run.py's clients):

- ``sqlite``: a worker (``python -m aqueue -A app worker -c 100``) on ``sqlite:///aqueue.db`` (broker
  and results in one file), a client in another process: *round trip* p50/p99 (``delay()`` then
  ``get()``, one after the other), *one at a time* (each ``delay()`` awaited before the next, then the
  results collected by 100 concurrent waiters) and *burst* (every ``delay()`` in flight at once, then
  the results) in tasks/s from the first send to the last result.
- ``memory``: ``memory://`` broker and results, the worker in the client's process and event loop;
  the same two throughput shapes.

*CPU µs/task* is the CPU time of the client and the worker over a shape, divided by the tasks: less
sensitive than the rates to other work on the machine.

With several checkouts, the runs are interleaved (run 1 of every checkout, then run 2, ...) and the
last column is the ratio of the last checkout to the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WINDOW = 100
TIMEOUT = 120.0
APP = """
    from aqueue import App

    app = App("bench_app", broker={broker!r}, backend={backend!r})


    @app.task
    async def noop() -> None:
        return None
"""


# --- inside a job process -------------------------------------------------------------------------


class _Cpu:
    """CPU seconds of this process and of ``pids`` (read from /proc; 0 where it is missing)."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids

    def __call__(self) -> float:
        total = time.process_time()
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


async def _one_at_a_time(send: Callable[[], Awaitable[Any]], n: int, cpu: _Cpu) -> dict[str, float]:
    t0, c0 = time.perf_counter(), cpu()
    handles = [await send() for _ in range(n)]
    await _collect(handles)
    return _rates("one at a time", n, time.perf_counter() - t0, cpu() - c0)


async def _burst(send: Callable[[], Any], n: int, cpu: _Cpu) -> dict[str, float]:
    t0, c0 = time.perf_counter(), cpu()
    handles = [send() for _ in range(n)]
    await asyncio.gather(*handles)
    await _collect(handles)
    return _rates("burst", n, time.perf_counter() - t0, cpu() - c0)


def _rates(shape: str, n: int, seconds: float, cpu: float) -> dict[str, float]:
    return {f"{shape} /s": n / seconds, f"{shape} CPU µs/task": 1e6 * cpu / n}


async def _collect(handles: list[Any]) -> None:
    for start in range(0, len(handles), WINDOW):
        await asyncio.gather(*(h.get(timeout=TIMEOUT) for h in handles[start : start + WINDOW]))


async def _round_trips(send: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await (await send()).get(timeout=TIMEOUT)
        out.append(time.perf_counter() - t0)
    return out


async def _sqlite_job(n: int, trips: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="aqueue-bench-") as folder:
        url = f"sqlite:///{folder}/aqueue.db"
        Path(folder, "bench_app.py").write_text(textwrap.dedent(APP.format(broker=url, backend=url)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "aqueue", "-A", "bench_app", "worker", "-c", "100"]
        worker = subprocess.Popen([*command, "--loglevel=warning"], env=env, cwd=folder)
        try:
            sys.path.insert(0, folder)
            import bench_app

            async with bench_app.app:
                noop = bench_app.noop
                await asyncio.wait_for(_round_trips(noop.delay, 20), 60)
                latencies = sorted(await _round_trips(noop.delay, trips))
                cpu = _Cpu(worker.pid)
                return {
                    "round trip p50 ms": 1000 * latencies[len(latencies) // 2],
                    "round trip p99 ms": 1000 * latencies[int(len(latencies) * 0.99)],
                    **await _one_at_a_time(noop.delay, n, cpu),
                    **await _burst(noop.delay, n, cpu),
                }
        finally:
            worker.terminate()
            worker.wait(30)


async def _memory_job(n: int) -> dict[str, float]:
    from aqueue import App
    from aqueue.worker import Worker

    app = App("bench_app", broker="memory://bench", backend="memory://bench")

    @app.task
    async def noop() -> None:
        return None

    async with app, Worker(app, concurrency=100):
        await _round_trips(noop.delay, 20)
        cpu = _Cpu()
        return {**await _one_at_a_time(noop.delay, n, cpu), **await _burst(noop.delay, n, cpu)}


def _job(kind: str, n: int, trips: int) -> None:
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    figures = run(_sqlite_job(n, trips) if kind == "sqlite" else _memory_job(n))
    print(json.dumps(figures), flush=True)


# --- the driver ----------------------------------------------------------------------------------


def _run(checkout: str, kind: str, n: int, trips: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--job", kind, "--n", str(n), "--trips", str(trips)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"{kind} on {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkouts", default=str(HERE.parent), help="comma-separated aqueue checkouts")
    parser.add_argument("--jobs", default="sqlite,memory")
    parser.add_argument("--n", type=int, default=10_000, help="tasks per throughput shape")
    parser.add_argument("--trips", type=int, default=1_000, help="sequential round trips")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return _job(args.job, args.n, args.trips)
    checkouts, jobs = args.checkouts.split(","), args.jobs.split(",")
    figures: dict[tuple[str, str, str], list[float]] = {}
    for run in range(args.runs):
        for kind in jobs:
            for checkout in checkouts[run % len(checkouts) :] + checkouts[: run % len(checkouts)]:
                for name, value in _run(checkout, kind, args.n, args.trips).items():
                    figures.setdefault((kind, name, checkout), []).append(value)
                print(f"run {run + 1}: {kind} on {checkout} done", file=sys.stderr)
    _table(figures, jobs, checkouts)


def _table(figures: dict[tuple[str, str, str], list[float]], jobs: list[str], checkouts: list[str]) -> None:
    header = ["job", "figure", *checkouts] + (["last / first"] if len(checkouts) > 1 else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    names = dict.fromkeys((kind, name) for kind, name, _ in figures)
    for kind, name in names:
        if kind not in jobs:
            continue
        medians = [statistics.median(figures[kind, name, c]) for c in checkouts]
        cells = [f"{m:,.2f}" if m < 100 else f"{m:,.0f}" for m in medians]
        if len(checkouts) > 1:
            cells.append(f"{medians[-1] / medians[0]:.2f}x")
        print(f"| {kind} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
