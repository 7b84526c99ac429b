"""What monitoring costs: W1 on Redis with a worker plain, with ``-E`` (events), and with ``--metrics-port``.

    python benchmarks/monitoring.py [--tasks 10000] [--runs 3] [--redis redis://127.0.0.1:6379/9] [--processes N]

W1 as in run.py: N no-op tasks sent by one asyncio producer (windows of 100) to one worker process
(``-c 100``; with ``--processes N``, N of them under one parent, which then serves the one ``/metrics``),
every result collected; the figure is tasks/s from the first send to the last result.
The modes (plain, events read, events nobody reads, metrics) run interleaved, each first in turn
(run 2 starts with the second mode), each figure is the median over the runs, and the ratios are to
the plain worker of the same run set. With ``-E``, once a process of its own reads every event during
the run (``aqueue events --json``), as Flower would, and once nobody does (what the worker alone pays
for sending them). The table also
gives the worker's CPU time (its processes' user + system time from ``/proc``, during the timed part)
per 1,000 tasks, which other load on the machine disturbs less than the rate does. Runs in this
project's environment (no peers needed). Take figures on a quiet machine; ``--tasks 500 --runs 1`` checks it works.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aqueue import App  # noqa: E402

WINDOW = 100
MODES = {
    "plain": [],
    "events (-E), read": ["-E", "--read-events"],
    "events (-E), nobody reading": ["-E"],
    "metrics": ["--metrics-port", "0"],
}
"""The worker's flags of each mode; ``--read-events`` is not one: it starts the events reader."""

TASKS = """
from aqueue import App

app = App("mon_bench", broker={url!r}, backend={url!r}, broker_transport_options={options!r},
          result_backend_transport_options={options!r}, task_default_queue="mon-bench",
          worker_metrics_address="127.0.0.1")


@app.task(name="noop")
async def noop():
    return None
"""


async def w1(app: App, n: int, cpu: Callable[[], float]) -> tuple[float, float]:
    """Tasks/s for ``n`` no-op tasks, every result collected, and the worker's CPU seconds meanwhile."""
    for _ in range(3):  # warm up: the worker is ready when these come back
        await app.send_task("noop").get(timeout=60)
    started, used = time.perf_counter(), cpu()
    results = []
    for i in range(0, n, WINDOW):
        batch = [app.send_task("noop") for _ in range(min(WINDOW, n - i))]
        await asyncio.gather(*batch)
        results += batch
    for i in range(0, n, WINDOW):
        await asyncio.gather(*(r.get(timeout=120) for r in results[i : i + WINDOW]))
    return n / (time.perf_counter() - started), cpu() - used


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and of its live children, from ``/proc`` (Linux)."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else []
        except OSError:
            continue
        if fields and (int(entry.name) == pid or int(fields[1]) == pid):
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def run_one(
    folder: Path, mode: list[str], n: int, worker_processes: int | None = None
) -> tuple[float, float]:
    aqueue = [sys.executable, "-m", "aqueue", "-A", "mon_tasks"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}
    quiet = {"cwd": folder, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scale = ["--processes", str(worker_processes)] if worker_processes else []
    flags = [flag for flag in mode if flag != "--read-events"]
    worker = [*aqueue, "worker", "-c", "100", "-l", "warning", *scale, *flags]
    processes = [subprocess.Popen(worker, **quiet)]  # type: ignore[call-overload]
    if "--read-events" in mode:
        processes.append(subprocess.Popen([*aqueue, "events", "--json"], **quiet))  # type: ignore[call-overload]
    try:
        spec = importlib.util.spec_from_file_location(
            f"mon_tasks_{uuid.uuid4().hex}", folder / "mon_tasks.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # a fresh app for each run: each runs in a loop of its own
        app: App = module.app

        async def go() -> tuple[float, float]:
            async with app:
                return await w1(app, n, lambda: cpu_seconds(processes[0].pid))

        return asyncio.run(go())
    finally:
        for process in processes:
            process.terminate()
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--processes", type=int, help="run each worker as --processes N")
    args = parser.parse_args()
    prefix = f"monbench-{uuid.uuid4().hex[:8]}:"
    options = {"global_keyprefix": prefix}
    figures: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "mon_tasks.py").write_text(TASKS.format(url=args.redis, options=options))
        try:
            for run in range(args.runs):
                order = list(MODES.items())
                order = order[run % len(order) :] + order[: run % len(order)]  # each mode first once
                for mode, flags in order:
                    rate, used = run_one(folder, flags, args.tasks, args.processes)
                    figures[mode].append(rate)
                    cpu[mode].append(used * 1000 / args.tasks * 1000)
                    print(
                        f"run {run + 1} {mode}: {rate:,.0f} tasks/s, {cpu[mode][-1]:,.0f} worker CPU ms "
                        "per 1,000 tasks",
                        file=sys.stderr,
                    )
        finally:
            _delete_keys(args.redis, prefix)
    plain, plain_cpu = statistics.median(figures["plain"]), statistics.median(cpu["plain"])
    shape = f", --processes {args.processes}" if args.processes else ""
    print(f"\nW1 on Redis{shape}, {args.tasks:,} no-op tasks, median of {args.runs} interleaved run(s)\n")
    print("| worker | W1 tasks/s | ratio to plain | worker CPU ms per 1,000 tasks | ratio to plain |")
    print("|---|---:|---:|---:|---:|")
    for mode, values in figures.items():
        median, used = statistics.median(values), statistics.median(cpu[mode])
        print(f"| {mode} | {median:,.0f} | {median / plain:.2f}x | {used:,.0f} | {used / plain_cpu:.2f}x |")


def _delete_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
