"""From the jobs' raw results to the tables: figures per job, medians per row, ratios, the targets."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _rows import Lib, Workload

__all__ = ["Table", "figures", "targets"]

ORDER = ["w1", "w2", "w3", "group", "chord", "chain"]
SHAPE_TITLES = {"burst": "bursts", "serial": "one at a time"}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def figures(workload: Workload, result: dict[str, Any]) -> dict[str, float]:
    """The table's figures from one job's raw result, keyed ``label:metric`` (``w1/serial:e2e``)."""
    if workload.name == "w2":
        ms = [x * 1000 for x in result["latencies"]]
        values = {"p50": _percentile(ms, 50), "p95": _percentile(ms, 95), "p99": _percentile(ms, 99)}
    else:
        seconds, n, tasks = result["t2"] - result["t0"], result["n"], result["tasks"]
        cpu = {
            "cpu_worker": result["worker_cpu"] / tasks * 1e6,
            "cpu_client": result["client_cpu"] / tasks * 1e6,
            "cpu_servers": result["server_cpu"] / tasks * 1e6,
        }
        values = {**cpu, "cpu_us": sum(cpu.values())}
        if workload.name == "w1":
            values.update(enqueue=n / (result["t1"] - result["t0"]), e2e=n / seconds, rss=result["rss_mb"])
        elif workload.name == "w3":
            values.update(tasks_per_s=n / seconds)
        else:
            values.update(ms=seconds * 1000)
    return {f"{workload.label}:{metric}": value for metric, value in values.items()}


# Columns ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    metric: str
    header: str  # may name {n}, the workload's size
    fmt: str
    higher: bool | None  # None: no ratio in brackets

    def text(self, table: Table, lib: str, key: str) -> str | None:
        value = table.median(lib, key)
        return None if value is None else self.fmt.format(value)


@dataclass(frozen=True)
class Split(Column):
    """Worker / client / servers CPU per task, each the median over the runs."""

    def text(self, table: Table, lib: str, key: str) -> str | None:
        label = key.rpartition(":")[0]
        parts = [table.median(lib, f"{label}:cpu_{role}") for role in ("worker", "client", "servers")]
        if any(part is None for part in parts):
            return None
        return " / ".join(f"{part:,.0f}" for part in parts if part is not None)


_CPU = [
    Column("cpu_us", "CPU µs/task", "{:,.0f}", False),
    Split("cpu_split", "of which worker / client / servers", "", None),
]
COLUMNS: dict[str, list[Column]] = {
    "w1": [
        Column("enqueue", "W1 enqueue/s", "{:,.0f}", True),
        Column("e2e", "W1 end-to-end/s", "{:,.0f}", True),
        Column("rss", "worker peak RSS MB", "{:.1f}", False),
        *_CPU,
    ],
    "w2": [
        Column("p50", "W2 p50 ms", "{:.2f}", False),
        Column("p95", "W2 p95 ms", "{:.2f}", False),
        Column("p99", "W2 p99 ms", "{:.2f}", False),
    ],
    "w3": [Column("tasks_per_s", "W3 tasks/s", "{:,.0f}", True)],
    **{
        name: [
            Column("ms", f"{what} ms", "{:,.1f}", False),
            Column("cpu_us", f"{name} CPU µs/task", "{:,.0f}", False),
        ]
        for name, what in (("group", "group of {n}"), ("chord", "chord of {n}"), ("chain", "chain of {n}"))
    },
}


# Tables ----------------------------------------------------------------------------------------


@dataclass
class Table:
    """One mode's figures on one broker: every run's samples per row, the failures, the rows not run."""

    mode: str
    broker: str
    libs: list[Lib]
    workloads: list[Workload]
    runs: int
    sizes: dict[str, int]
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.libs[0].name

    def lib(self, name: str) -> Lib:
        return next(lib for lib in self.libs if lib.name == name)

    def add(self, lib: Lib, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.samples.setdefault((lib.name, key), []).append(value)

    def fail(self, lib: Lib, workload: Workload, error: str) -> None:
        self.errors.setdefault(lib.name, []).append(f"{workload.title}: {error}")

    def median(self, lib: str, key: str) -> float | None:
        values = self.samples.get((lib, key))
        return statistics.median(values) if values else None

    def sections(self) -> list[tuple[str, list[Workload]]]:
        """The tables to print: one per producer shape (W2, which has none, with the first), or one."""
        shapes = [shape for shape in SHAPE_TITLES if any(w.shape == shape for w in self.workloads)]
        if not shapes:
            return [(self.mode, self.workloads)]
        out = [(SHAPE_TITLES[shape], [w for w in self.workloads if w.shape == shape]) for shape in shapes]
        out[0][1].extend(w for w in self.workloads if w.shape is None)
        return [(title, sorted(ws, key=lambda w: ORDER.index(w.name))) for title, ws in out]

    def cell(self, lib: Lib, workload: Workload, column: Column) -> str:
        if lib.name in self.unavailable:
            return "n/a"
        if not lib.runs(workload):
            return "—"
        key = f"{workload.label}:{column.metric}"
        text = column.text(self, lib.name, key)
        if text is None:
            return "FAILED"
        count = len(self.samples.get((lib.name, key), [])) or len(
            self.samples.get((lib.name, f"{workload.label}:cpu_worker"), [])
        )
        if count < self.runs:
            text += f" ({count}/{self.runs} runs)"
        base = self.median(self.base, key)
        value = self.median(lib.name, key)
        if column.higher is not None and base and value is not None and lib.name != self.base:
            text += f" ({value / base:.2f}x)"
        return text

    def markdown(self, workloads: list[Workload]) -> str:
        columns = [(w, c) for w in workloads for c in COLUMNS[w.name]]
        headers = [c.header.format(n=f"{self.sizes[w.name]:,}") for w, c in columns]
        rows = ["| library | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(columns)]
        for lib in self.libs:
            rows.append(f"| {lib.name} | " + " | ".join(self.cell(lib, w, c) for w, c in columns) + " |")
        return "\n".join(rows)


# Targets ---------------------------------------------------------------------------------------

Line = Callable[[str, "bool | None"], None]


def targets(table: Table) -> list[str]:
    """The targets for this table, each with the measured figure and MET, MISSED or n/a (no figure)."""
    out: list[str] = []

    def line(text: str, ok: bool | None) -> None:
        out.append(f"- {text}: {'MET' if ok else 'MISSED' if ok is not None else 'n/a'}")

    def info(text: str) -> None:
        out.append(f"- {text}")

    check = _Checks(table, line, info)
    {"tasks": check.tasks, "workflows": check.workflows, "scale": check.scale}[table.mode]()
    return out


@dataclass
class _Checks:
    table: Table
    line: Line
    info: Callable[[str], None]

    def peers(self, workload: str) -> list[str]:
        return [
            lib.name
            for lib in self.table.libs
            if not lib.is_aqueue and not lib.reference and lib.runs(Workload(workload))
        ]

    def has(self, label: str) -> bool:
        return any(w.label == label for w in self.table.workloads)

    def tasks(self) -> None:
        if self.table.broker == "redis":
            self.redis_bursts()
            self.redis_one_at_a_time()
            self.embedded()
        else:
            self.amqp_bursts()
            self.amqp_one_at_a_time()

    def redis_bursts(self) -> None:
        me, peers = "aqueue", self.peers("w1")
        if self.has("w1/burst"):
            self.ratio(me, peers, "w1/burst:e2e", True, 3.4, "Bursts: W1 end-to-end")
            self.at_most(me, "w1/burst:cpu_us", 150, "Bursts: W1 CPU per task", "µs")
            self.at_most(me, "w1/burst:rss", 40, "Bursts: worker peak RSS", "MB")
            self.share(
                me, "redis-py ceiling", "w1/burst:e2e", "Bursts: aqueue's share of the redis-py ceiling"
            )
        if self.has("w2"):
            self.ratio(me, peers, "w2:p50", False, 0.7, "W2 p50")
            self.at_most(me, "w2:p99", 2, "W2 p99", "ms")
        if self.has("w3/burst"):
            self.ratio(me, peers, "w3/burst:tasks_per_s", True, 5, "Bursts: W3")

    def redis_one_at_a_time(self) -> None:
        me, peers = "aqueue", self.peers("w1")
        if not self.has("w1/serial"):
            return
        self.ratio(me, peers, "w1/serial:e2e", True, 3, "One at a time: W1 end-to-end")
        worker, client = (self.table.median(me, f"w1/serial:cpu_{role}") for role in ("worker", "client"))
        total = worker + client if worker is not None and client is not None else None
        self.line(
            f"One at a time: W1 client + worker CPU {total:,.0f} µs per task (target <= 300)"
            if total is not None
            else "One at a time: W1 client + worker CPU",
            total <= 300 if total is not None else None,
        )
        self.share(
            me,
            "redis-py ceiling",
            "w1/serial:enqueue",
            "One at a time: aqueue's enqueue/s against one XADD awaited at a time",
        )
        if self.has("w3/serial"):
            self.ratio(me, self.peers("w3"), "w3/serial:tasks_per_s", True, 3, "One at a time: W3")

    def embedded(self) -> None:
        sqlite, memory, peers = "aqueue (sqlite)", "aqueue (memory)", self.peers("w1")
        if any(lib.name == sqlite for lib in self.table.libs):
            if self.has("w1/serial"):
                self.ratio(
                    sqlite,
                    peers,
                    "w1/serial:e2e",
                    True,
                    2,
                    "SQLite, one at a time: W1 against the peers on Redis",
                )
            if self.has("w2"):
                self.at_most(sqlite, "w2:p50", 2, "SQLite: W2 p50", "ms")
                self.at_most(sqlite, "w2:p99", 5, "SQLite: W2 p99", "ms")
        if any(lib.name == memory for lib in self.table.libs):
            for label, title in (("w1/burst", "bursts"), ("w1/serial", "one at a time")):
                if self.has(label):
                    self.at_least(
                        memory, f"{label}:e2e", 30_000, f"memory:// in one process, {title}: W1", "/s"
                    )

    def amqp_bursts(self) -> None:
        me, reference, peers = "aqueue (rpc)", "aio-pika reference", self.peers("w1")
        if self.has("w1/burst"):
            self.ratio(me, peers, "w1/burst:e2e", True, 3, "Bursts: W1 end-to-end (rpc)")
            self.ratio(
                "aqueue (redis)", peers, "w1/burst:e2e", True, 3, "Bursts: W1 end-to-end (redis backend)"
            )
            self.against(
                me, reference, "w1/burst:e2e", 1, "Bursts: W1 against the one-confirm-at-a-time aio-pika loop"
            )
        if self.has("w2"):
            self.at_most(me, "w2:p50", 1, "W2 p50 with rpc://", "ms")
        if self.has("w3/burst"):
            self.ratio(me, peers, "w3/burst:tasks_per_s", True, 3, "Bursts: W3 (rpc)")

    def amqp_one_at_a_time(self) -> None:
        me, reference = "aqueue (rpc)", "aio-pika reference"
        if not self.has("w1/serial"):
            return
        self.against(
            me, reference, "w1/serial:e2e", 0.95, "One at a time: W1 (rpc) against the aio-pika loop"
        )
        celery = [name for name in self.peers("w1") if name.startswith("celery")]
        self.ratio(me, celery, "w1/serial:e2e", True, 1.3, "One at a time: W1 (rpc) against Celery")

    def workflows(self) -> None:
        for name in ("group", "chord", "chain"):
            if self.has(name):
                self.ratio("aqueue", self.peers(name), f"{name}:ms", False, 1 / 3, f"{name} time (3x faster)")

    def scale(self) -> None:
        for label, title in (("w1/burst", "bursts"), ("w1/serial", "one at a time")):
            if not self.has(label):
                continue
            key = f"{label}:e2e"
            for name, against in (
                ("aqueue --processes 2", "aqueue --processes 1"),
                ("aqueue --processes 2 (2 producers)", "aqueue --processes 1"),
                ("aqueue --processes 1", "aqueue"),
            ):
                mine, theirs = self.table.median(name, key), self.table.median(against, key)
                if mine and theirs:
                    self.info(
                        f"{title}: W1 end-to-end, {name} / {against}: {mine / theirs:.2f}x ({mine:,.0f} against {theirs:,.0f}/s)"
                    )
                else:
                    self.info(f"{title}: W1 end-to-end, {name} / {against}: no figure")

    # Helpers -----------------------------------------------------------------------------------

    def ratio(self, me: str, peers: list[str], key: str, higher: bool, want: float, label: str) -> None:
        """``me`` against the best of ``peers``: at least ``want`` times (or at most, lower being better)."""
        t = self.table
        mine = t.median(me, key)
        found = [(name, v) for name in peers if (v := t.median(name, key)) is not None]
        if mine is None or not found:
            self.line(f"{label}: no figure", None)
            return
        best = max(found, key=lambda x: x[1]) if higher else min(found, key=lambda x: x[1])
        ratio = mine / best[1]
        unit, digits = _unit(key)
        sign = ">=" if higher else "<="
        whom = "the best peer, " if len(peers) > 1 else ""
        self.line(
            f"{label} {mine:,.{digits}f}{unit} = {ratio:.2f}x {whom}{best[0]} "
            f"({best[1]:,.{digits}f}{unit}; target {sign} {want:.2f}x)",
            ratio >= want if higher else ratio <= want,
        )

    def against(self, me: str, other: str, key: str, want: float, label: str) -> None:
        self.ratio(me, [other], key, True, want, label)

    def at_most(self, me: str, key: str, limit: float, label: str, unit: str) -> None:
        value = self.table.median(me, key)
        digits = 2 if unit == "ms" else 1 if unit == "MB" else 0
        shown = f"{label} {value:,.{digits}f} {unit} (target <= {limit:g})" if value is not None else label
        self.line(shown, value <= limit if value is not None else None)

    def at_least(self, me: str, key: str, limit: float, label: str, unit: str) -> None:
        value = self.table.median(me, key)
        shown = f"{label} {value:,.0f}{unit} (target >= {limit:,g})" if value is not None else label
        self.line(shown, value >= limit if value is not None else None)

    def share(self, me: str, ceiling: str, key: str, label: str) -> None:
        mine, top = self.table.median(me, key), self.table.median(ceiling, key)
        if mine and top:
            self.info(f"{label}: {mine / top:.0%} ({mine:,.0f} of {top:,.0f}/s)")


def _unit(key: str) -> tuple[str, int]:
    metric = key.rpartition(":")[2]
    if metric in ("p50", "p95", "p99", "ms"):
        return " ms", 2
    return "/s", 0
