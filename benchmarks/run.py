"""aqueue against its peers on the same Redis and RabbitMQ, in the same run.

    bash benchmarks/setup.sh                       # once: the benchmark's own virtualenvs
    python benchmarks/run.py [--broker redis|amqp|all] [--runs 3] [--quick]

Each job starts one library's worker with that library's own CLI, runs one workload from a separate
client process (``client.py``), measures, and stops the worker. Runs are interleaved (run 1: every
library W1, then W2, then W3; run 2: ...) and each figure is the median over the runs, so the noise of
a shared machine hits every library alike. See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APPS = HERE / "apps"
VENV = HERE / ".venv"
ARQ_VENV = HERE / ".venv-arq"


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
import redis  # noqa: E402

__all__ = ["main"]

FULL = {"w1": 10_000, "w2": 1_000, "w3": 5_000}
QUICK = {"w1": 1_000, "w2": 100, "w3": 1_000}
CONCURRENCY = {"w1": 100, "w2": 100, "w3": 1_000}
POLL = {"w1": 0.01, "w2": 0.001, "w3": 0.01}
WORKLOAD_TIMEOUT = 180.0
WARMUP_TIMEOUT = 60.0
VHOST_PREFIX = "aqbench-"
AMQP_ROOT = "amqp://guest:guest@127.0.0.1:5672/"


# Libraries -------------------------------------------------------------------------------------


def _bin(name: str, venv: Path = VENV) -> str:
    return str(venv / "bin" / name)


@dataclass(frozen=True)
class Lib:
    """One row of a table: how to start its worker, which client adapter drives it, where its data lives."""

    name: str
    client: str
    worker: Callable[[int], list[str]]
    db: int
    broker: str = "redis"  # redis | amqp (then ``vhost`` is used)
    backend: str = "redis"  # redis | rpc
    venv: Path = VENV
    note: str = ""
    extra_env: tuple[tuple[str, str], ...] = ()

    @property
    def vhost(self) -> str:
        return VHOST_PREFIX + self.name.replace(" ", "").replace("(", "-").replace(")", "").replace(",", "-")


def _aqueue(c: int) -> list[str]:
    return [_bin("python"), "-m", "aqueue", "-A", "aq_app", "worker", "-c", str(c), "--loglevel=warning"]


def _aqueue_processes(n: int) -> Callable[[int], list[str]]:
    return lambda c: [*_aqueue(c), "--processes", str(n)]


def process_rows(broker: str, counts: list[int]) -> list[Lib]:
    """With --processes: one aqueue row per process count (Redis results), after the table's own rows."""
    first = {"redis": 10, "amqp": 9}[broker]  # the next database numbers after the table's own
    return [
        Lib(f"aqueue --processes {n}", "aqueue", _aqueue_processes(n), first + i, broker=broker)
        for i, n in enumerate(counts)
    ]


def _celery(c: int) -> list[str]:
    return [
        _bin("celery"),
        "-A",
        "celery_app",
        "worker",
        "--pool=threads",
        f"--concurrency={c}",
        "--loglevel=WARNING",
    ]


def _taskiq(module: str) -> Callable[[int], list[str]]:
    def argv(c: int) -> list[str]:
        return [
            _bin("taskiq"),
            "worker",
            f"{module}:broker",
            "--workers",
            "1",
            "--max-async-tasks",
            str(c),
            "--log-level",
            "WARNING",
        ]

    return argv


def _dramatiq(c: int) -> list[str]:
    return [_bin("dramatiq"), "dramatiq_app", "--processes", "1", "--threads", str(c)]


def _arq(c: int) -> list[str]:
    return [_bin("arq", ARQ_VENV), "arq_app.WorkerSettings", "--custom-log-dict", "arq_app.LOG_CONFIG"]


def _saq(c: int) -> list[str]:
    return [_bin("saq"), "saq_app.settings"]


def _streaq(c: int) -> list[str]:
    return [_bin("streaq"), "run", "streaq_app:worker"]


def _script(name: str) -> Callable[[int], list[str]]:
    return lambda c: [_bin("python"), name]


SYNC = (("BENCH_DRAMATIQ_SYNC", "1"),)

# Database numbers: one per library within a table (the tables never run at the same time).
REDIS_LIBS = [
    Lib("aqueue", "aqueue", _aqueue, 1),
    Lib(
        "taskiq",
        "taskiq",
        _taskiq("taskiq_app"),
        2,
        note="taskiq-redis RedisStreamBroker + RedisAsyncResultBackend",
    ),
    Lib("arq", "arq", _arq, 3, venv=ARQ_VENV, note="own virtualenv (arq pins redis<6): redis-py 5 + hiredis"),
    Lib("saq", "saq", _saq, 4),
    Lib("streaq", "streaq", _streaq, 5),
    Lib("celery", "celery", _celery, 6, note="sync tasks, --pool=threads"),
    Lib("dramatiq", "dramatiq", _dramatiq, 7, note="async actors (AsyncIO middleware), Redis results"),
    Lib(
        "dramatiq (sync)",
        "dramatiq",
        _dramatiq,
        8,
        note="plain actors, no AsyncIO middleware",
        extra_env=SYNC,
    ),
    Lib("redis-py ceiling", "ceiling-redis", _script("ceiling_redis.py"), 9),
]

AMQP_LIBS = [
    Lib("aqueue (rpc)", "aqueue", _aqueue, 1, broker="amqp", backend="rpc"),
    Lib("aqueue (redis)", "aqueue", _aqueue, 2, broker="amqp"),
    Lib("taskiq-aio-pika", "taskiq-amqp", _taskiq("taskiq_amqp_app"), 3, broker="amqp", note="Redis results"),
    Lib("dramatiq", "dramatiq", _dramatiq, 4, broker="amqp", note="async actors, Redis results"),
    Lib(
        "dramatiq (sync)",
        "dramatiq",
        _dramatiq,
        5,
        broker="amqp",
        note="plain actors, Redis results",
        extra_env=SYNC,
    ),
    Lib(
        "celery (rpc)", "celery", _celery, 6, broker="amqp", backend="rpc", note="sync tasks, --pool=threads"
    ),
    Lib("celery (redis)", "celery", _celery, 7, broker="amqp", note="sync tasks, --pool=threads"),
    Lib("aio-pika reference", "ceiling-amqp", _script("ceiling_amqp.py"), 8, broker="amqp"),
]


# Servers ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of our own on a spare loopback port: no other tenant's traffic in its CPU figures."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit(
            "redis-server is not installed; pass --redis-url redis://127.0.0.1:6379 to use a running one."
        )
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "16",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            with suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def reset_vhost(vhost: str) -> None:
    """Drop the library's vhost with everything in it, and make it anew."""
    with suppress(subprocess.CalledProcessError):
        _rabbitmqctl("delete_vhost", vhost)
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def _rabbit_process() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            return proc
    return None


# Measuring -------------------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pid: int) -> float:
    total = 0.0
    for proc in _tree(pid):
        with suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak resident set (VmHWM) of the worker's processes (a supervisor counts too)."""
    total_kb = 0
    for proc in _tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


class Meters:
    """CPU seconds used so far by the servers the job talks to."""

    def __init__(self, redis_url: str, amqp: bool) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.rabbit = _rabbit_process() if amqp else None

    def servers_cpu(self) -> float:
        info = self.redis.info("cpu")
        total = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        if self.rabbit is not None:
            with suppress(psutil.NoSuchProcess):
                times = self.rabbit.cpu_times()
                total += times.user + times.system
        return total


# One job ---------------------------------------------------------------------------------------


class JobError(Exception):
    pass


@dataclass
class Job:
    lib: Lib
    workload: str
    n: int
    redis_url: str
    logdir: Path
    profile: Path | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        lib, redis_db = self.lib, f"{self.redis_url}/{self.lib.db}"
        amqp = f"{AMQP_ROOT}{lib.vhost}"
        env = dict(os.environ)
        env.update(
            BENCH_REDIS_URL=redis_db,
            BENCH_AMQP_URL=amqp,
            BENCH_BROKER_URL=amqp if lib.broker == "amqp" else redis_db,
            BENCH_BACKEND_URL="rpc://" if lib.backend == "rpc" else redis_db,
            BENCH_CONCURRENCY=str(CONCURRENCY[self.workload]),
            BENCH_POLL=str(POLL[self.workload]),
            BENCH_TIMEOUT=str(WORKLOAD_TIMEOUT),
            PYTHONPATH=str(APPS),
        )
        env.update(lib.extra_env)
        env.pop("VIRTUAL_ENV", None)
        return env

    def run(self, meters: Meters) -> dict[str, Any]:
        self._prepare()
        tag = f"{self.lib.vhost}-{self.workload}"
        worker_log = self.logdir / f"{tag}-worker.log"
        client_log = self.logdir / f"{tag}-client.log"
        env = self.env()
        worker = self._spawn(self.lib.worker(CONCURRENCY[self.workload]), env, worker_log, stdin=False)
        client = self._spawn(
            [
                str(self.lib.venv / "bin" / "python"),
                str(HERE / "client.py"),
                self.lib.client,
                self.workload,
                str(self.n),
            ],
            env,
            client_log,
            stdin=True,
        )
        lines = _line_reader(client)
        try:
            self._expect(lines, "start", WARMUP_TIMEOUT, worker, worker_log, client_log)
            spies = self._spy(tag, {"worker": worker.pid, "client": client.pid})
            before = (tree_cpu(worker.pid), meters.servers_cpu())
            self._go(client)
            self._expect(lines, "end", WORKLOAD_TIMEOUT + 10, worker, worker_log, client_log)
            after = (tree_cpu(worker.pid), meters.servers_cpu())
            self._unspy(spies)
            rss = tree_peak_rss_mb(worker.pid)
            self._go(client)
            result = self._expect(lines, "result", 30, worker, worker_log, client_log)
        finally:
            self.stop()
        result["worker_cpu"] = after[0] - before[0]
        result["server_cpu"] = after[1] - before[1]
        result["rss_mb"] = rss
        return result

    def _spy(self, tag: str, pids: dict[str, int]) -> list[tuple[subprocess.Popen[Any], Path]]:
        """With --profile: py-spy on the worker and the client over the measured window."""
        if self.profile is None:
            return []
        spies = []
        for role, pid in pids.items():
            out = self.profile / f"{tag}-{role}.raw"
            argv = [
                _bin("py-spy"),
                "record",
                "-p",
                str(pid),
                "-f",
                "raw",
                "-F",
                "-r",
                "200",
                "-o",
                str(out),
            ]
            if role == "worker":
                argv.append("--subprocesses")
            with out.with_suffix(".log").open("w") as log:
                spy = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
            self.procs.append(spy)
            spies.append((spy, out))
        time.sleep(0.5)  # py-spy attaches
        return spies

    def _unspy(self, spies: list[tuple[subprocess.Popen[Any], Path]]) -> None:
        for spy, out in spies:
            with suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            with suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            if out.exists():
                summary = summarize_profile(out)
                out.with_suffix(".top.txt").write_text(summary)
                _log(f"  profile {out.name}:\n" + "\n".join(summary.splitlines()[:14]))

    def _prepare(self) -> None:
        r = redis.Redis.from_url(f"{self.redis_url}/{self.lib.db}")
        r.flushdb()
        r.close()
        if self.lib.broker == "amqp":
            reset_vhost(self.lib.vhost)

    def _spawn(
        self, argv: list[str], env: dict[str, str], log: Path, *, stdin: bool
    ) -> subprocess.Popen[Any]:
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv,
                cwd=APPS,
                env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdin else out,
                stderr=out,
                text=True,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    @staticmethod
    def _go(client: subprocess.Popen[Any]) -> None:
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()

    def _expect(
        self,
        lines: queue.Queue[str | None],
        event: str,
        timeout: float,
        worker: subprocess.Popen[Any],
        worker_log: Path,
        client_log: Path,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(f"no '{event}' within {timeout:.0f}s" + _tails(worker, worker_log, client_log))
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                if worker.poll() is not None:
                    raise JobError(
                        f"worker exited with {worker.returncode}" + _tails(worker, worker_log, client_log)
                    ) from None
                continue
            if line is None:
                raise JobError(f"client exited before '{event}'" + _tails(worker, worker_log, client_log))
            with suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and message.get("event") == event:
                    return message

    def stop(self) -> None:
        """SIGTERM each process group started, SIGKILL what is left after 10 s."""
        for proc in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs.clear()


def _line_reader(proc: subprocess.Popen[Any]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _tails(worker: subprocess.Popen[Any], worker_log: Path, client_log: Path) -> str:
    def tail(path: Path) -> str:
        with suppress(OSError):
            text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            return "\n    ".join(text[-12:])
        return ""

    return f"\n  worker ({' '.join(map(str, worker.args))}):\n    {tail(worker_log)}\n  client:\n    {tail(client_log)}"


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "no samples\n"
    lines = [f"{total} samples; self time:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in sorted(own.items(), key=lambda x: -x[1])[:top]]
    lines.append("inclusive time:")
    lines += [
        f"  {n / total:6.1%}  {frame}" for frame, n in sorted(inclusive.items(), key=lambda x: -x[1])[:top]
    ]
    return "\n".join(lines) + "\n"


# Aggregating -----------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def figures(workload: str, result: dict[str, Any], n: int) -> dict[str, float]:
    """The table's figures from one job's raw result."""
    if workload == "w1":
        cpu = result["client_cpu"] + result["worker_cpu"] + result["server_cpu"]
        return {
            "w1_enqueue": result["enqueue_per_s"],
            "w1_e2e": result["tasks_per_s"],
            "rss": result["rss_mb"],
            "cpu_us": cpu / n * 1e6,
        }
    if workload == "w2":
        ms = [x * 1000 for x in result["latencies"]]
        return {"w2_p50": _percentile(ms, 50), "w2_p95": _percentile(ms, 95), "w2_p99": _percentile(ms, 99)}
    return {"w3": result["tasks_per_s"]}


COLUMNS = [
    # key, header, higher is better, format
    ("w1_enqueue", "W1 enqueue/s", True, "{:,.0f}"),
    ("w1_e2e", "W1 end-to-end/s", True, "{:,.0f}"),
    ("rss", "worker peak RSS MB", False, "{:.1f}"),
    ("cpu_us", "CPU µs/task", False, "{:,.0f}"),
    ("w2_p50", "W2 p50 ms", False, "{:.2f}"),
    ("w2_p95", "W2 p95 ms", False, "{:.2f}"),
    ("w2_p99", "W2 p99 ms", False, "{:.2f}"),
    ("w3", "W3 tasks/s", True, "{:,.0f}"),
]


@dataclass
class Table:
    broker: str
    libs: list[Lib]
    runs: int
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, lib: Lib, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.samples.setdefault((lib.name, key), []).append(value)

    def fail(self, lib: Lib, workload: str, error: str) -> None:
        self.errors.setdefault(lib.name, []).append(f"{workload.upper()}: {error}")

    def median(self, lib: str, key: str) -> float | None:
        values = self.samples.get((lib, key))
        return statistics.median(values) if values else None

    def cell(self, lib: str, key: str, fmt: str, base: float | None) -> str:
        value = self.median(lib, key)
        if value is None:
            return "FAILED"
        count = len(self.samples[(lib, key)])
        text = fmt.format(value)
        if count < self.runs:
            text += f" ({count}/{self.runs} runs)"
        if base and lib != self.libs[0].name:
            text += f" ({value / base:.2f}x)"
        return text

    def markdown(self) -> str:
        base = self.libs[0].name
        head = "| library | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |"
        rule = "|---|" + "---:|" * len(COLUMNS)
        rows = [head, rule]
        for lib in self.libs:
            cells = [self.cell(lib.name, key, fmt, self.median(base, key)) for key, _, _, fmt in COLUMNS]
            rows.append(f"| {lib.name} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _best_peer(table: Table, key: str, higher: bool, peers: list[str]) -> tuple[str, float] | None:
    found = [(name, v) for name in peers if (v := table.median(name, key)) is not None]
    if not found:
        return None
    return max(found, key=lambda x: x[1]) if higher else min(found, key=lambda x: x[1])


def targets(table: Table) -> list[str]:
    """Issue 3's or issue 4's targets, each with the measured figure and MET or MISSED."""
    out: list[str] = []

    def line(text: str, ok: bool | None) -> None:
        out.append(f"- {text}: {'MET' if ok else 'MISSED' if ok is not None else 'n/a'}")

    if table.broker == "redis":
        me, ceiling = "aqueue", "redis-py ceiling"
        peers = [lib.name for lib in table.libs if not lib.name.startswith("aqueue") and lib.name != ceiling]
        _ratio_target(table, line, me, peers, "w1_e2e", True, 3.4, "W1 end-to-end")
        cpu = table.median(me, "cpu_us")
        line(
            f"W1 CPU per task {cpu:,.0f} µs (target <= 150)" if cpu else "W1 CPU per task",
            cpu is not None and cpu <= 150 if cpu else None,
        )
        _ratio_target(table, line, me, peers, "w2_p50", False, 0.7, "W2 p50")
        p99 = table.median(me, "w2_p99")
        line(f"W2 p99 {p99:.2f} ms (target <= 2 ms)" if p99 else "W2 p99", p99 <= 2 if p99 else None)
        _ratio_target(table, line, me, peers, "w3", True, 5, "W3")
        rss = table.median(me, "rss")
        line(
            f"worker peak RSS {rss:.1f} MB (target <= 40)" if rss else "worker peak RSS",
            rss <= 40 if rss else None,
        )
        mine, top = table.median(me, "w1_e2e"), table.median(ceiling, "w1_e2e")
        if mine and top:
            out.append(
                f"- aqueue's share of the redis-py ceiling on W1 end-to-end: {mine / top:.0%} ({mine:,.0f} of {top:,.0f}/s)"
            )
    else:
        me, reference = "aqueue (rpc)", "aio-pika reference"
        peers = [
            lib.name for lib in table.libs if not lib.name.startswith("aqueue") and lib.name != reference
        ]
        _ratio_target(table, line, me, peers, "w1_e2e", True, 3, "W1 end-to-end (rpc)")
        _ratio_target(
            table, line, "aqueue (redis)", peers, "w1_e2e", True, 3, "W1 end-to-end (redis backend)"
        )
        mine, ref = table.median(me, "w1_e2e"), table.median(reference, "w1_e2e")
        line(
            f"W1 end-to-end {mine:,.0f}/s vs the one-confirm-at-a-time aio-pika loop {ref:,.0f}/s ({mine / ref:.2f}x, target >= 1x)"
            if mine and ref
            else "W1 end-to-end vs the aio-pika reference",
            mine >= ref if mine and ref else None,
        )
        p50 = table.median(me, "w2_p50")
        line(
            f"W2 p50 with rpc:// {p50:.2f} ms (target <= 1 ms)" if p50 else "W2 p50 with rpc://",
            p50 <= 1 if p50 else None,
        )
        _ratio_target(table, line, me, peers, "w3", True, 3, "W3 (rpc)")
    return out


def _ratio_target(
    table: Table,
    line: Callable[[str, bool | None], None],
    me: str,
    peers: list[str],
    key: str,
    higher: bool,
    want: float,
    label: str,
) -> None:
    mine, best = table.median(me, key), _best_peer(table, key, higher, peers)
    if mine is None or best is None:
        line(f"{label}: no figure", None)
        return
    ratio = mine / best[1]
    unit, digits = ("ms", 2) if key.startswith("w2") else ("/s", 0)
    sign = ">=" if higher else "<="
    line(
        f"{label} {mine:,.{digits}f}{unit} = {ratio:.2f}x the best peer "
        f"({best[0]} {best[1]:,.{digits}f}{unit}; target {sign} {want}x)",
        ratio >= want if higher else ratio <= want,
    )


# Driving ---------------------------------------------------------------------------------------


def versions(libs: list[Lib]) -> dict[str, str]:
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
    out = {}
    for venv, packages in ((VENV, names), (ARQ_VENV, ["arq", "redis", "hiredis"])):
        script = "import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n    try: out[n] = m.version(n)\n    except Exception: out[n] = 'not installed'\nprint(json.dumps(out))"
        try:
            found = json.loads(
                subprocess.run(
                    [_bin("python", venv), "-c", script, *packages],
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


def run_table(
    broker: str,
    libs: list[Lib],
    runs: int,
    sizes: dict[str, int],
    redis_url: str,
    logdir: Path,
    workloads: list[str],
    profile: Path | None = None,
) -> Table:
    table = Table(broker, libs, runs)
    meters = Meters(redis_url, amqp=broker == "amqp")
    for run in range(runs):
        order = libs[run % len(libs) :] + libs[: run % len(libs)]  # rotate, so no library always goes first
        for workload in workloads:
            for lib in order:
                job = Job(lib, workload, sizes[workload], redis_url, logdir, profile)
                started = time.monotonic()
                try:
                    raw = job.run(meters)
                    values = figures(workload, raw, sizes[workload])
                except JobError as exc:
                    table.fail(lib, workload, str(exc))
                    _log(
                        f"[{broker} run {run + 1}/{runs}] {workload} {lib.name}: FAILED {str(exc).splitlines()[0]}"
                    )
                    continue
                table.add(lib, values)
                shown = ", ".join(f"{k}={v:,.2f}" for k, v in values.items())
                if raw.get("counters"):
                    shown += f", {raw['counters']}"
                if workload == "w1":
                    shown += ", cpu s worker/client/servers={worker_cpu:.2f}/{client_cpu:.2f}/{server_cpu:.2f}".format(
                        **raw
                    )
                _log(
                    f"[{broker} run {run + 1}/{runs}] {workload} {lib.name}: {shown} ({time.monotonic() - started:.0f}s)"
                )
    if broker == "amqp":
        for lib in libs:
            with suppress(subprocess.CalledProcessError):
                _rabbitmqctl("delete_vhost", lib.vhost)
    return table


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(tables: list[Table], runs: int, sizes: dict[str, int]) -> str:
    cpu = psutil.cpu_count()
    head = [
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Python {platform.python_version()}, {platform.system()} {platform.machine()}, {cpu} CPUs. "
        f"Median of {runs} interleaved runs. W1 = {sizes['w1']:,} no-op tasks, W2 = {sizes['w2']:,} round trips, W3 = {sizes['w3']:,} x sleep(0.05) at concurrency 1,000.",
        "Ratios in brackets are each figure divided by aqueue's (first row).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions([]).items()),
    ]
    head.append(f"aqueue under test: {_aqueue_source()}")
    parts = ["\n".join(head)]
    for table in tables:
        title = "Redis" if table.broker == "redis" else "RabbitMQ"
        section = [f"### {title}", "", table.markdown(), ""]
        notes = [f"- {lib.name}: {lib.note}" for lib in table.libs if lib.note]
        if notes:
            section += ["Setup notes:", *notes, ""]
        section += ["Targets:", *targets(table), ""]
        if table.errors:
            section.append("Failures:")
            for name, errors in table.errors.items():
                for error in errors:
                    section.append(f"- {name} {error.splitlines()[0]}")
            section.append("")
        parts.append("\n".join(section))
    return "\n\n".join(parts)


def _aqueue_source() -> str:
    """Where the benchmark's aqueue comes from: this checkout (editable, at which commit) or elsewhere."""
    script = "import aqueue, pathlib; print(pathlib.Path(aqueue.__file__).resolve().parent.parent)"
    found = subprocess.run(
        [_bin("python"), "-c", script], capture_output=True, text=True, cwd=APPS, check=False
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


def main() -> None:
    """Parse the options, run the tables, print them (and write them with --markdown)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=["redis", "amqp", "all"], default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--libs", help="comma-separated library names to run (default: all)")
    parser.add_argument("--workloads", default="w1,w2,w3", help="comma-separated: w1,w2,w3")
    parser.add_argument(
        "--redis-url", help="use this Redis (e.g. redis://127.0.0.1:6379) instead of a private redis-server"
    )
    parser.add_argument(
        "--processes",
        help="comma-separated process counts (at most 5, e.g. 1,2): adds an aqueue row per count, its "
        "worker started with --processes N (on RabbitMQ with Redis results)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the worker and the client of every job over its measured window, into this folder "
        "(collapsed stacks + a summary each); the figures of such a run are slowed by the sampling",
    )
    parser.add_argument(
        "--logs", type=Path, help="keep worker and client logs here (default: a temporary folder)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every started process is stopped
    sizes = QUICK if args.quick else FULL
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    chosen = {name.strip() for name in args.libs.split(",")} if args.libs else None
    counts = [int(n) for n in args.processes.split(",") if n.strip()] if args.processes else []
    if len(counts) > 5 or any(n < 1 for n in counts):
        parser.error("--processes takes at most 5 counts, each at least 1")
    plan = []
    if args.broker in ("redis", "all"):
        plan.append(("redis", REDIS_LIBS))
    if args.broker in ("amqp", "all"):
        plan.append(("amqp", AMQP_LIBS))
    logdir = args.logs or Path(tempfile.mkdtemp(prefix="aqbench-"))
    logdir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    _log(f"logs in {logdir}")
    with _redis(args.redis_url) as redis_url:
        tables = []
        for broker, libs in plan:
            libs = [lib for lib in libs if chosen is None or lib.name in chosen]
            libs += process_rows(broker, counts)
            if libs:
                tables.append(
                    run_table(broker, libs, args.runs, sizes, redis_url, logdir, workloads, args.profile)
                )
    text = report(tables, args.runs, sizes)
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
