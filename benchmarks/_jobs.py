"""One job: start a row's worker and client processes, measure one workload, stop them all."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from _rows import Lib, Workload, bin_path

__all__ = ["Job", "JobError", "Meters", "delete_vhost", "private_redis", "probe"]

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
AMQP_ROOT = "amqp://guest:guest@127.0.0.1:5672/"
CONCURRENCY = {"w1": 100, "w2": 100, "w3": 1_000, "group": 100, "chord": 100, "chain": 100}
POLL = {"w1": 0.01, "w2": 0.001, "w3": 0.01, "group": 0.01, "chord": 0.01, "chain": 0.01}
WORKLOAD_TIMEOUT = 180.0
WARMUP_TIMEOUT = 60.0


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
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*argv, "--databases", "16"],
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
    """Drop the row's vhost with everything in it, and make it anew."""
    delete_vhost(vhost)
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def delete_vhost(vhost: str) -> None:
    with suppress(subprocess.CalledProcessError):
        _rabbitmqctl("delete_vhost", vhost)


def _rabbit_process() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            return proc
    return None


def probe(code: str) -> bool:
    """Whether ``code`` exits 0 in the benchmark's virtualenv, with the apps importable."""
    env = {**os.environ, "PYTHONPATH": str(APPS)}
    env.pop("VIRTUAL_ENV", None)
    try:
        done = subprocess.run(
            [bin_path("python"), "-c", code], cwd=APPS, env=env, capture_output=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


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
    """Sum of the peak resident set (VmHWM) of a process and its children (a supervisor counts too)."""
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
class _Proc:
    role: str
    argv: list[str]
    popen: subprocess.Popen[Any]
    log: Path
    lines: queue.Queue[str | None] | None = None


@dataclass
class Job:
    """One row's workload: its worker (unless the client runs it), ``lib.producers`` clients sharing
    the ``n`` tasks, the CPU and memory figures around the clients' measured window."""

    lib: Lib
    workload: Workload
    n: int
    redis_url: str
    logdir: Path
    datadir: Path
    profile: Path | None = None
    procs: list[_Proc] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"{self.lib.vhost}-{self.workload.label.replace('/', '-')}"

    def env(self) -> dict[str, str]:
        lib, redis_db = self.lib, f"{self.redis_url}/{self.lib.db}"
        brokers = {
            "redis": redis_db,
            "amqp": f"{AMQP_ROOT}{lib.vhost}",
            "sqlite": f"sqlite:///{self.datadir / f'{lib.db}-broker.db'}",
            "memory": "memory://",
        }
        backends = {
            **brokers,
            "rpc": "rpc://",
            "sqlite": f"sqlite:///{self.datadir / f'{lib.db}-results.db'}",
        }
        name = self.workload.name
        env = dict(os.environ)
        env.update(
            BENCH_REDIS_URL=redis_db,
            BENCH_AMQP_URL=brokers["amqp"],
            BENCH_BROKER_URL=brokers[lib.broker],
            BENCH_BACKEND_URL=backends[lib.backend],
            BENCH_CONCURRENCY=str(CONCURRENCY[name]),
            BENCH_POLL=str(POLL[name]),
            BENCH_TIMEOUT=str(WORKLOAD_TIMEOUT),
            PYTHONPATH=str(APPS),
        )
        env.update(lib.extra_env)
        env.pop("VIRTUAL_ENV", None)
        return env

    def shares(self) -> list[int]:
        p = self.lib.producers
        return [self.n // p + (1 if i < self.n % p else 0) for i in range(p)]

    def run(self, meters: Meters) -> dict[str, Any]:
        """Run the job; the clients' results merged, with the worker's CPU and RSS and the servers' CPU."""
        self._prepare()
        env = self.env()
        worker = None
        if self.lib.worker is not None:
            argv = self.lib.worker(CONCURRENCY[self.workload.name])
            worker = self._spawn("worker", argv, env, stdin=False)
        clients = [
            self._spawn(
                f"client{i}" if len(self.shares()) > 1 else "client",
                [
                    bin_path("python", self.lib.venv),
                    str(HERE / "client.py"),
                    self.lib.client,
                    self.workload.name,
                    self.workload.shape or "-",
                    str(share),
                ],
                env,
                stdin=True,
            )
            for i, share in enumerate(self.shares())
        ]
        measured = worker or clients[0]  # in-process: the client is the worker
        try:
            self._expect_all(clients, "start", WARMUP_TIMEOUT)
            spies = self._spy([*([worker] if worker else []), *clients])
            before = (tree_cpu(worker.popen.pid) if worker else 0.0, meters.servers_cpu())
            self._go(clients)
            self._expect_all(clients, "end", WORKLOAD_TIMEOUT + 10)
            after = (tree_cpu(worker.popen.pid) if worker else 0.0, meters.servers_cpu())
            self._unspy(spies)
            rss = tree_peak_rss_mb(measured.popen.pid)
            self._go(clients)
            results = self._expect_all(clients, "result", 30)
        finally:
            self.stop()
        merged = merge(results)
        merged.update(worker_cpu=after[0] - before[0], server_cpu=after[1] - before[1], rss_mb=rss)
        return merged

    def _prepare(self) -> None:
        if "redis" in (self.lib.broker, self.lib.backend):
            r = redis.Redis.from_url(f"{self.redis_url}/{self.lib.db}")
            r.flushdb()
            r.close()
        if self.lib.broker == "amqp":
            reset_vhost(self.lib.vhost)
        for path in self.datadir.glob(f"{self.lib.db}-*.db*"):  # the databases and their wake-up folders
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if self.lib.broker == "sqlite":
            self._create_files()

    def _create_files(self) -> None:
        """Make the SQLite files before the worker and the client open them: two processes creating
        a new file at the same moment can fail with "database is locked"."""
        code = "import asyncio, aq_app\nasync def main():\n    await aq_app.app.connect()\n    await aq_app.app.aclose()\nasyncio.run(main())"
        env = self.env()
        done = subprocess.run(
            [bin_path("python"), "-c", code], cwd=APPS, env=env, capture_output=True, text=True, timeout=60
        )
        if done.returncode:
            raise JobError(f"could not create the SQLite files: {done.stderr.strip()[-500:]}")

    def _spawn(self, role: str, argv: list[str], env: dict[str, str], *, stdin: bool) -> _Proc:
        log = self.logdir / f"{self.tag}-{role}.log"
        with log.open("w") as out:
            popen = subprocess.Popen(
                argv,
                cwd=APPS,
                env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdin else out,
                stderr=out,
                text=True,
                start_new_session=True,
            )
        proc = _Proc(role, argv, popen, log, _line_reader(popen) if stdin else None)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _go(clients: list[_Proc]) -> None:
        for client in clients:
            assert client.popen.stdin is not None
            client.popen.stdin.write("go\n")
            client.popen.stdin.flush()

    def _expect_all(self, clients: list[_Proc], event: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self._expect(client, event, deadline) for client in clients]

    def _expect(self, client: _Proc, event: str, deadline: float) -> dict[str, Any]:
        assert client.lines is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(f"no '{event}' from the {client.role} in time" + self._tails())
            try:
                line = client.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                for proc in self.procs:
                    if proc.role == "worker" and proc.popen.poll() is not None:
                        raise JobError(
                            f"worker exited with {proc.popen.returncode}" + self._tails()
                        ) from None
                continue
            if line is None:
                raise JobError(f"{client.role} exited before '{event}'" + self._tails())
            with suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and message.get("event") == event:
                    return message

    def _tails(self) -> str:
        def tail(path: Path) -> str:
            with suppress(OSError):
                text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
                return "\n    ".join(text[-12:])
            return ""

        return "".join(
            f"\n  {proc.role} ({' '.join(proc.argv)}):\n    {tail(proc.log)}"
            for proc in self.procs
            if proc.role != "py-spy"
        )

    def _spy(self, watched: list[_Proc]) -> list[tuple[subprocess.Popen[Any], Path]]:
        """With --profile: py-spy on the worker and the clients over the measured window."""
        if self.profile is None:
            return []
        spies = []
        for proc in watched:
            out = self.profile / f"{self.tag}-{proc.role}.raw"
            argv = [bin_path("py-spy"), "record", "-p", str(proc.popen.pid), "-f", "raw", "-F", "-r", "200"]
            argv += ["-o", str(out)]
            if proc.role == "worker":
                argv.append("--subprocesses")
            with out.with_suffix(".log").open("w") as log:
                spy = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
            self.procs.append(_Proc("py-spy", argv, spy, out.with_suffix(".log")))
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
                text = "\n".join(summary.splitlines()[:14])
                print(f"  profile {out.name}:\n{text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """SIGTERM each process group started, SIGKILL what is left after 10 s."""
        for proc in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            with suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()
        self.procs.clear()


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The clients' results as one: the window from the first start to the last finish, sums of the
    counts and CPU, every latency."""
    merged: dict[str, Any] = {"client_cpu": sum(r["client_cpu"] for r in results), "counters": {}}
    for r in results:
        for key, value in r.get("counters", {}).items():
            merged["counters"][key] = merged["counters"].get(key, 0) + value
    if "latencies" in results[0]:
        merged["latencies"] = [x for r in results for x in r["latencies"]]
        return merged
    merged.update(
        t0=min(r["t0"] for r in results),
        t1=max(r["t1"] for r in results),
        t2=max(r["t2"] for r in results),
        n=sum(r["n"] for r in results),
        tasks=sum(r["tasks"] for r in results),
    )
    return merged


def _line_reader(proc: subprocess.Popen[Any]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


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
