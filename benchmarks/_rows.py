"""The rows of the tables: each library's worker command, client adapter and data, per mode and broker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARQ_VENV", "MODES", "VENV", "Lib", "Mode", "Probe", "Workload", "bin_path"]

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
ARQ_VENV = HERE / ".venv-arq"
VHOST_PREFIX = "aqbench-"
WORKFLOWS = frozenset({"group", "chord", "chain"})


def bin_path(name: str, venv: Path = VENV) -> str:
    return str(venv / "bin" / name)


@dataclass(frozen=True)
class Probe:
    """Something a row needs from the aqueue under test: ``code`` exits 0 in the benchmark's virtualenv
    when it is there; else the row is not run and the report says ``missing``."""

    code: str
    missing: str


CANVAS = Probe("from aqueue import chain, chord, group", "aqueue canvas not available")
PROCESSES = Probe(
    "import subprocess, sys\n"
    "usage = subprocess.run([sys.executable, '-m', 'aqueue', 'worker', '--help'],"
    " capture_output=True, text=True).stdout\n"
    "sys.exit('--processes' not in usage)",
    "aqueue worker --processes not available",
)


@dataclass(frozen=True)
class Workload:
    """One kind of job: W1, W2, W3 or a workflow, and for W1 and W3 the producer's shape."""

    name: str  # w1 | w2 | w3 | group | chord | chain
    shape: str | None = None  # burst | serial (W1 and W3 only)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.shape}" if self.shape else self.name

    @property
    def title(self) -> str:
        shape = {"burst": ", bursts", "serial": ", one at a time"}.get(self.shape or "", "")
        return self.name.upper() + shape if self.name.startswith("w") else self.name + shape


@dataclass(frozen=True)
class Lib:
    """One row of a table: how to start its worker, which client adapter drives it, where its data lives.

    ``worker`` is None when the client runs the worker in its own process (memory://). ``producers``
    client processes share the tasks between them. ``workflows`` are the ones the library has.
    """

    name: str
    client: str
    worker: Callable[[int], list[str]] | None
    db: int
    broker: str = "redis"  # redis | amqp | sqlite | memory
    backend: str = "redis"  # redis | rpc | sqlite | memory
    venv: Path = VENV
    note: str = ""
    extra_env: tuple[tuple[str, str], ...] = ()
    producers: int = 1
    workflows: frozenset[str] = frozenset()
    requires: Probe | None = None
    reference: bool = False  # a hand-written ceiling, not a library: never "the best peer"

    @property
    def vhost(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in self.name)
        return VHOST_PREFIX + "-".join(part for part in slug.split("-") if part)

    @property
    def is_aqueue(self) -> bool:
        return self.name.startswith("aqueue")

    def runs(self, workload: Workload) -> bool:
        """Whether this row has a figure for ``workload`` (a library without a workflow has none)."""
        return workload.name not in WORKFLOWS or workload.name in self.workflows


# Worker commands -------------------------------------------------------------------------------


def _aqueue(processes: int | None = None) -> Callable[[int], list[str]]:
    def argv(c: int) -> list[str]:
        flags = ["--processes", str(processes)] if processes else []
        return [
            bin_path("python"),
            "-m",
            "aqueue",
            "-A",
            "aq_app",
            "worker",
            "-c",
            str(c),
            *flags,
            "--loglevel=warning",
        ]

    return argv


def _celery(c: int) -> list[str]:
    return [
        bin_path("celery"),
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
            bin_path("taskiq"),
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
    return [bin_path("dramatiq"), "dramatiq_app", "--processes", "1", "--threads", str(c)]


def _arq(c: int) -> list[str]:
    return [bin_path("arq", ARQ_VENV), "arq_app.WorkerSettings", "--custom-log-dict", "arq_app.LOG_CONFIG"]


def _saq(c: int) -> list[str]:
    return [bin_path("saq"), "saq_app.settings"]


def _streaq(c: int) -> list[str]:
    return [bin_path("streaq"), "run", "streaq_app:worker"]


def _script(name: str) -> Callable[[int], list[str]]:
    return lambda c: [bin_path("python"), name]


SYNC = (("BENCH_DRAMATIQ_SYNC", "1"),)
CELERY_NOTE = "sync tasks, --pool=threads"

# Tasks mode: W1, W2, W3 ------------------------------------------------------------------------
# Database numbers: one per row within a table (the tables never run at the same time).

TASKS_REDIS = [
    Lib("aqueue", "aqueue", _aqueue(), 1),
    Lib(
        "aqueue (sqlite)",
        "aqueue",
        _aqueue(),
        10,
        broker="sqlite",
        backend="sqlite",
        note="the embedded default: sqlite:/// broker and result backend (two files), no server",
    ),
    Lib(
        "aqueue (memory)",
        "aqueue-inprocess",
        None,
        11,
        broker="memory",
        backend="memory",
        note="memory:// with the worker in the client's process: its CPU and RSS are the client's",
    ),
    Lib(
        "aqueue (kombu lists)",
        "aqueue",
        _aqueue(),
        0,
        note="Redis in kombu's list layout (broker_transport_options={'layout': 'kombu'}), as shared with Celery",
        extra_env=(("BENCH_AQ_LAYOUT", "kombu"),),
    ),
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
    Lib("celery", "celery", _celery, 6, note=CELERY_NOTE),
    Lib("dramatiq", "dramatiq", _dramatiq, 7, note="async actors (AsyncIO middleware), Redis results"),
    Lib(
        "dramatiq (sync)",
        "dramatiq",
        _dramatiq,
        8,
        note="plain actors, no AsyncIO middleware",
        extra_env=SYNC,
    ),
    Lib(
        "redis-py ceiling",
        "ceiling-redis",
        _script("ceiling_redis.py"),
        9,
        reference=True,
        note="one at a time, its producer awaits one XADD per task: that shape's ceiling for a producer",
    ),
]

TASKS_AMQP = [
    Lib("aqueue (rpc)", "aqueue", _aqueue(), 1, broker="amqp", backend="rpc"),
    Lib("aqueue (redis)", "aqueue", _aqueue(), 2, broker="amqp"),
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
    Lib("celery (rpc)", "celery", _celery, 6, broker="amqp", backend="rpc", note=CELERY_NOTE),
    Lib("celery (redis)", "celery", _celery, 7, broker="amqp", note=CELERY_NOTE),
    Lib(
        "aio-pika reference",
        "ceiling-amqp",
        _script("ceiling_amqp.py"),
        8,
        broker="amqp",
        reference=True,
        note="one publisher confirm awaited per publish, in both shapes",
    ),
]

# Workflows mode: a group, a chord, a chain ------------------------------------------------------

WORKFLOW_ENV = (("BENCH_WORKFLOWS", "1"),)

WORKFLOWS_REDIS = [
    Lib("aqueue", "aqueue", _aqueue(), 1, workflows=WORKFLOWS, requires=CANVAS),
    Lib(
        "celery",
        "celery",
        _celery,
        2,
        workflows=WORKFLOWS,
        note=CELERY_NOTE + "; group, chord, chain",
    ),
    Lib(
        "dramatiq (sync)",
        "dramatiq",
        _dramatiq,
        3,
        workflows=WORKFLOWS,
        extra_env=SYNC + WORKFLOW_ENV,
        note="plain actors; group, group + completion callback (GroupCallbacks middleware; the callback "
        "does not receive the results), pipeline",
    ),
    Lib(
        "saq",
        "saq",
        _saq,
        4,
        workflows=frozenset({"group"}),
        note="group: queue.map (polls, every 10 ms here)",
    ),
    Lib(
        "streaq",
        "streaq",
        _streaq,
        5,
        workflows=frozenset({"chord", "chain"}),
        note="chain: a pipeline of .then(); chord: a task started after=[the 1,000 ids] (it does not "
        "receive their results)",
    ),
]

# Scale mode: W1 with worker processes ----------------------------------------------------------


def _scale(broker: str, backend: str) -> list[Lib]:
    def row(name: str, db: int, processes: int | None, producers: int = 1) -> Lib:
        return Lib(
            name,
            "aqueue",
            _aqueue(processes),
            db,
            broker=broker,
            backend=backend,
            producers=producers,
            requires=PROCESSES if processes else None,
        )

    return [
        row("aqueue", 1, None),
        row("aqueue --processes 1", 2, 1),
        row("aqueue --processes 2", 3, 2),
        row("aqueue --processes 2 (2 producers)", 4, 2, producers=2),
    ]


# Modes -----------------------------------------------------------------------------------------

W1, W3 = ("w1", "w3")
SHAPED = [
    Workload(W1, "burst"),
    Workload(W1, "serial"),
    Workload("w2"),
    Workload(W3, "burst"),
    Workload(W3, "serial"),
]


@dataclass(frozen=True)
class Mode:
    """What one mode runs: per broker, its rows and its workloads (in the interleaving order)."""

    name: str
    tables: dict[str, list[Lib]]
    workloads: list[Workload]


MODES = {
    "tasks": Mode("tasks", {"redis": TASKS_REDIS, "amqp": TASKS_AMQP}, SHAPED),
    "workflows": Mode(
        "workflows", {"redis": WORKFLOWS_REDIS}, [Workload("group"), Workload("chord"), Workload("chain")]
    ),
    "scale": Mode(
        "scale",
        {"redis": _scale("redis", "redis"), "amqp": _scale("amqp", "rpc")},
        [Workload(W1, "burst"), Workload(W1, "serial")],
    ),
}
