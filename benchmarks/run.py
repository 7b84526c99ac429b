"""aqueue against its peers on the same Redis and RabbitMQ, in the same run.

    bash benchmarks/setup.sh                       # once: the benchmark's own virtualenvs
    python benchmarks/run.py [--mode tasks|workflows|scale] [--broker redis|amqp|all] [--runs 3] [--quick]

Each job starts one row's worker with that library's own CLI, runs one workload from separate client
processes (``client.py``), measures, and stops the worker. Runs are interleaved (run 1: every row's W1
in bursts, then one at a time, then W2, ...; run 2: ...) and each figure is the median over the runs, so
the noise of a shared machine hits every library alike. See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".venv"


def _reexec_in_venv() -> None:
    """Run under the benchmark's virtualenv, where the peers are installed (not the project's)."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not python.exists():
        raise SystemExit(f"No benchmark virtualenv at {VENV}: run `bash {HERE / 'setup.sh'}` first.")
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


if __name__ == "__main__":
    _reexec_in_venv()

import psutil  # noqa: E402
from _jobs import APPS, Job, JobError, Meters, delete_vhost, private_redis, probe  # noqa: E402
from _report import Table, figures, targets  # noqa: E402
from _rows import ARQ_VENV, MODES, Lib, Workload, bin_path  # noqa: E402

__all__ = ["main"]

FULL = {"w1": 10_000, "w2": 1_000, "w3": 5_000, "group": 1_000, "chord": 1_000, "chain": 100}
QUICK = {"w1": 1_000, "w2": 100, "w3": 1_000, "group": 100, "chord": 100, "chain": 20}
BROKER_TITLES = {"redis": "Redis", "amqp": "RabbitMQ"}


@dataclass
class Runner:
    """Where the jobs run: the Redis, the folders for logs, data files and profiles."""

    redis_url: str
    logdir: Path
    datadir: Path
    profile: Path | None = None

    def table(self, table: Table) -> None:
        """Every run of every workload of every available row, interleaved; the table filled in."""
        meters = Meters(self.redis_url, amqp=table.broker == "amqp")
        libs = [lib for lib in table.libs if lib.name not in table.unavailable]
        for run in range(table.runs):
            order = libs[run % len(libs) :] + libs[: run % len(libs)]  # rotate: no row always goes first
            prefix = f"[{table.mode} {table.broker} run {run + 1}/{table.runs}]"
            for workload in table.workloads:
                for lib in order:
                    if lib.runs(workload):
                        self.job(table, lib, workload, meters, prefix)
        if table.broker == "amqp":
            for lib in libs:
                delete_vhost(lib.vhost)

    def job(self, table: Table, lib: Lib, workload: Workload, meters: Meters, prefix: str) -> None:
        size = table.sizes[workload.name]
        job = Job(lib, workload, size, self.redis_url, self.logdir, self.datadir, self.profile)
        started = time.monotonic()
        try:
            raw = job.run(meters)
            values = figures(workload, raw)
        except JobError as exc:
            table.fail(lib, workload, str(exc))
            _log(f"{prefix} {workload.label} {lib.name}: FAILED {str(exc).splitlines()[0]}")
            return
        table.add(lib, values)
        shown = ", ".join(f"{k.partition(':')[2]}={v:,.2f}" for k, v in values.items())
        if raw.get("counters"):
            shown += f", {raw['counters']}"
        _log(f"{prefix} {workload.label} {lib.name}: {shown} ({time.monotonic() - started:.0f}s)")


def check_requirements(table: Table) -> None:
    """Rows needing what the aqueue under test may not have yet (``Lib.requires``) are marked not run."""
    for lib in table.libs:
        if lib.requires is not None and not probe(lib.requires.code):
            table.unavailable[lib.name] = lib.requires.missing
            _log(f"{lib.requires.missing}: {lib.name} is not run")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# Report ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Installed versions of every package the tables depend on, per virtualenv."""
    names = [
        "aqueue",
        "celery",
        "kombu",
        "taskiq",
        "taskiq-redis",
        "taskiq-aio-pika",
        "saq",
        "streaq",
        "coredis",
        "dramatiq",
        "redis",
        "aio-pika",
        "hiredis",
        "uvloop",
        "pika",
    ]
    script = (
        "import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n    except Exception: out[n] = 'not installed'\nprint(json.dumps(out))"
    )
    out = {}
    for venv, packages in ((VENV, names), (ARQ_VENV, ["arq", "redis", "hiredis"])):
        try:
            found = json.loads(
                subprocess.run(
                    [bin_path("python", venv), "-c", script, *packages],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
        except (OSError, subprocess.CalledProcessError, ValueError):
            found = dict.fromkeys(packages, "not installed")
        suffix = " (arq venv)" if venv == ARQ_VENV else ""
        out.update({f"{k}{suffix}": v for k, v in found.items()})
    return out


def _sizes_line(tables: list[Table]) -> str:
    """What was run, with the counts."""
    sizes = tables[0].sizes
    names = {w.name for table in tables for w in table.workloads}
    shapes = {w.shape for table in tables for w in table.workloads if w.shape}
    what = {
        "w1": f"W1 = {sizes['w1']:,} no-op tasks",
        "w2": f"W2 = {sizes['w2']:,} round trips",
        "w3": f"W3 = {sizes['w3']:,} x sleep(0.05) at concurrency 1,000",
        "group": f"a group of {sizes['group']:,} no-op tasks",
        "chord": f"a chord of {sizes['chord']:,} (no-op tasks, one callback)",
        "chain": f"a chain of {sizes['chain']:,}",
    }
    parts = [text for name, text in what.items() if name in names]
    line = ", ".join(parts) + "."
    line = line[0].upper() + line[1:]
    if names & {"group", "chord", "chain"}:
        line += " Workflows: time from the first send to the final result."
    if "burst" in shapes:
        line += " Bursts: each library's way of sending many tasks."
    if "serial" in shapes:
        line += " One at a time: each send awaited (returned, for Celery and Dramatiq) before the next."
    if shapes:
        line += " The results are collected 100 at a time, the same way for every library."
    return line


def report(tables: list[Table], runs: int, elapsed: float) -> str:
    head = [
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {psutil.cpu_count()} CPUs. Median of {runs} interleaved "
        f"runs; the whole run took {elapsed / 60:.0f} min.",
        _sizes_line(tables),
        "Ratios in brackets are each figure divided by the first row's (aqueue's).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"aqueue under test: {_aqueue_source()}",
    ]
    parts = ["\n".join(head)]
    for table in tables:
        broker = BROKER_TITLES[table.broker]
        section: list[str] = []
        for title, workloads in table.sections():
            section += [f"### {broker}: {title}", "", table.markdown(workloads), ""]
        notes = [f"- {lib.name}: {lib.note}" for lib in table.libs if lib.note]
        if notes:
            section += ["Setup notes:", *notes, ""]
        section += ["Targets:", *targets(table), ""]
        if table.unavailable:
            section += ["Not run:", *(f"- {name}: {why}" for name, why in table.unavailable.items()), ""]
        if table.errors:
            section.append("Failures:")
            section += [
                f"- {name} {error.splitlines()[0]}"
                for name, errors in table.errors.items()
                for error in errors
            ]
            section.append("")
        parts.append("\n".join(section))
    return "\n\n".join(parts)


def _aqueue_source() -> str:
    """Where the benchmark's aqueue comes from: this checkout (editable, at which commit) or elsewhere."""
    script = "import aqueue, pathlib; print(pathlib.Path(aqueue.__file__).resolve().parent.parent)"
    found = subprocess.run(
        [bin_path("python"), "-c", script], capture_output=True, text=True, cwd=APPS, check=False
    )
    where = found.stdout.strip() or "not importable"
    if Path(where) != REPO:
        return f"installed at {where} (not this checkout)"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "aqueue"], capture_output=True, text=True
    )
    return f"this checkout at {head.stdout.strip()}" + (
        " with uncommitted changes in aqueue/" if dirty.stdout.strip() else ""
    )


# Command line ----------------------------------------------------------------------------------


def _parse_sizes(text: str | None, base: dict[str, int]) -> dict[str, int]:
    sizes = dict(base)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--sizes takes NAME=N items with NAME one of {', '.join(sizes)}; got {item!r}")
        sizes[name] = int(value)
    return sizes


def _names(text: str | None) -> set[str] | None:
    return {name.strip() for name in text.split(",") if name.strip()} if text else None


def plan(args: argparse.Namespace, sizes: dict[str, int]) -> list[Table]:
    """The tables to run: the mode's brokers and rows, the workloads and shapes asked for."""
    mode = MODES[args.mode]
    brokers = list(mode.tables) if args.broker == "all" else [args.broker]
    missing = [b for b in brokers if b not in mode.tables]
    if missing:
        raise SystemExit(
            f"--mode {args.mode} runs on {', '.join(mode.tables)} only, not {', '.join(missing)}"
        )
    libs_wanted, names, shapes = _names(args.libs), _names(args.workloads), _names(args.shapes)
    workloads = [
        w
        for w in mode.workloads
        if (names is None or w.name in names) and (shapes is None or w.shape is None or w.shape in shapes)
    ]
    if not workloads:
        raise SystemExit(
            f"no workload left: --mode {args.mode} has {', '.join(w.label for w in mode.workloads)}"
        )
    tables = []
    for broker in brokers:
        libs = [lib for lib in mode.tables[broker] if libs_wanted is None or lib.name in libs_wanted]
        if args.baseline:
            libs += baseline_rows(libs, args.baseline)
        if libs:
            tables.append(Table(args.mode, broker, libs, workloads, args.runs, sizes))
    if not tables:
        raise SystemExit("no row left: --libs names rows of the table, e.g. 'aqueue,celery'")
    return tables


BASELINE_DBS = range(12, 16)
"""Redis databases (of the private redis-server's 16) and SQLite file numbers of the baseline rows."""


def baseline_rows(libs: list[Lib], checkout: Path) -> list[Lib]:
    """A copy of each aqueue row that runs the aqueue of ``checkout`` (a clone or worktree at another
    commit), in the same run, interleaved with the others: its ratios to the first row are the change."""
    checkout = checkout.resolve()
    if not (checkout / "aqueue" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: not a checkout of aqueue (no aqueue/__init__.py)")
    found = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    label = found.stdout.strip() if found.returncode == 0 else checkout.name
    mine = [lib for lib in libs if lib.is_aqueue]
    if len(mine) > len(BASELINE_DBS):
        raise SystemExit(f"--baseline copies at most {len(BASELINE_DBS)} aqueue rows: name fewer with --libs")
    path = ("PYTHONPATH", f"{checkout}{os.pathsep}{APPS}")
    return [
        replace(lib, name=f"{lib.name} @ {label}", db=db, extra_env=(*lib.extra_env, path))
        for lib, db in zip(mine, BASELINE_DBS, strict=False)
    ]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode",
        choices=list(MODES),
        default="tasks",
        help="tasks: W1-W3 in both producer shapes (default); workflows: group, chord, chain; "
        "scale: W1 with worker --processes 1 and 2",
    )
    parser.add_argument("--broker", choices=["redis", "amqp", "all"], default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--sizes", help="override counts, e.g. w1=500,w2=50 (after --quick)")
    parser.add_argument("--libs", help="comma-separated row names to run (default: all)")
    parser.add_argument("--workloads", help="comma-separated: w1,w2,w3 or group,chord,chain (default: all)")
    parser.add_argument("--shapes", help="comma-separated producer shapes: burst,serial (default: both)")
    parser.add_argument(
        "--redis-url", help="use this Redis (e.g. redis://127.0.0.1:6379) instead of a private redis-server"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run every aqueue row with the aqueue of this checkout (e.g. a git worktree at an "
        "earlier commit), interleaved: the before and after of a change in one run",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the worker and the clients of every job over its measured window, into this folder "
        "(collapsed stacks + a summary each); the figures of such a run are slowed by the sampling",
    )
    parser.add_argument(
        "--logs", type=Path, help="keep worker and client logs here (default: a temporary folder)"
    )
    return parser.parse_args()


def main() -> None:
    """Parse the options, run the tables, print them (and write them with --markdown)."""
    args = _arguments()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every started process is stopped
    sizes = _parse_sizes(args.sizes, QUICK if args.quick else FULL)
    tables = plan(args, sizes)
    logdir = args.logs or Path(tempfile.mkdtemp(prefix="aqbench-"))
    logdir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    _log(f"logs in {logdir}")
    started = time.monotonic()
    datadir = Path(tempfile.mkdtemp(prefix="aqbench-data-"))
    try:
        with _redis(args.redis_url) as redis_url:
            for table in tables:
                check_requirements(table)
                Runner(redis_url, logdir, datadir, args.profile).table(table)
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
    text = report(tables, args.runs, time.monotonic() - started)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    if url:
        yield url.rstrip("/")
    else:
        with private_redis() as private:
            yield private


if __name__ == "__main__":
    main()
