"""One ``/metrics`` for ``worker --processes N --metrics-port PORT``: the parent serves what its children count.

prometheus_client's multiprocess mode does the adding up. The parent makes a private folder, starts
every child with ``PROMETHEUS_MULTIPROC_DIR`` naming it, and serves ``/metrics`` from a
``MultiProcessCollector`` reading it. Each child counts into files of its own there (memory-mapped, so
a value is in the file as soon as it is counted, even if the child is then killed outright). When the
parent sees a child exit (recycled, killed, crashed), it adds the child's counter and histogram files
into one archive file per type and removes them, and it removes the child's gauges (``livesum``:
active and prefetched tasks; ``mark_process_dead``). So the totals keep what every child counted, the
gauges add up the live children only, and the folder holds a bounded number of files however often
children are recycled. Scrapes and that compaction take one lock, so a scrape never sees a child's
figures twice or not at all. The parent removes the folder when it exits.

Pushing values from the children to the parent over their socket was the other way: it loses what a
child counted since its last push when the child is killed, and needs a protocol of its own.

The archive is written with prometheus_client's ``mmap_dict`` (the format ``MultiProcessCollector``
reads; its ``merge`` docstring speaks of writing merged data back). Its names are checked at import;
without them dead children's files are left in place, which is still correct, only slower to scrape.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import suppress
from types import TracebackType
from typing import Any, Self

from aqueue.worker.metrics import MetricsServer  # first: without prometheus_client, it says what to install

# isort: split
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.registry import Collector

try:
    from prometheus_client.mmap_dict import MmapedDict

    _COMPACTS = callable(getattr(MmapedDict, "read_all_values_from_file", None)) and all(
        callable(getattr(MmapedDict, name, None)) for name in ("read_value", "write_value", "close")
    )
except ImportError:  # pragma: no cover - a prometheus_client without the module
    _COMPACTS = False

__all__ = ["SupervisedMetrics"]

logger = logging.getLogger("aqueue.worker")

_SUMMED = ("counter", "histogram")
"""The file types whose values add up across processes (gauges are per live process)."""


class SupervisedMetrics:
    """A private multiprocess folder for the children of one parent, and the server adding it up.

    ``async with`` makes the folder and starts serving on ``address:port`` (0: any free port); leaving
    stops serving and removes the folder.

    Parameters:
        port: the port to serve ``/metrics`` on.
        address: the address to serve it on.
    """

    def __init__(self, port: int, address: str) -> None:
        self.port, self.address = port, address
        self.folder: str | None = None
        self._server: MetricsServer | None = None
        self._lock = threading.Lock()
        self._archives: dict[str, Any] = {}

    @property
    def environment(self) -> dict[str, str]:
        """What a child's environment needs so that it counts into the folder."""
        assert self.folder is not None, "not entered"
        return {"PROMETHEUS_MULTIPROC_DIR": self.folder}

    def process_exited(self, pid: int) -> None:
        """Fold the counters and histograms of child ``pid``, which has exited, into the archive; drop its gauges."""
        if self.folder is None:
            return
        with self._lock:
            if _COMPACTS:
                for kind in _SUMMED:
                    self._fold(kind, os.path.join(self.folder, f"{kind}_{pid}.db"))
            with suppress(OSError):  # removed already
                multiprocess.mark_process_dead(pid, self.folder)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        """Make the folder and start serving.

        Raises:
            ImproperlyConfigured: the port cannot be used.
        """
        self.folder = tempfile.mkdtemp(prefix="aqueue-metrics-")
        registry = CollectorRegistry()
        registry.register(_Locked(multiprocess.MultiProcessCollector(None, self.folder), self._lock))  # type: ignore[no-untyped-call]
        server = MetricsServer(registry, self.port, self.address)
        try:
            server.start()
        except BaseException:
            self._remove_folder()
            raise
        self._server = server
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, self._server = self._server, None
        try:
            if server is not None:
                await server.aclose()
        finally:
            self._remove_folder()

    def _fold(self, kind: str, path: str) -> None:
        try:
            values = list(MmapedDict.read_all_values_from_file(path))  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            return  # the child counted nothing of this kind
        except (OSError, ValueError, struct.error) as exc:
            logger.warning("Cannot read the metrics file %s of an exited worker process: %s", path, exc)
            return
        archive = self._archives.get(kind)
        if archive is None:
            assert self.folder is not None
            archived = os.path.join(self.folder, f"{kind}_archive.db")
            archive = self._archives[kind] = MmapedDict(archived)  # type: ignore[no-untyped-call]
        for key, value, _timestamp, _position in values:
            total, _ = archive.read_value(key)
            archive.write_value(key, total + value, 0.0)
        os.remove(path)

    def _remove_folder(self) -> None:
        with self._lock:
            for archive in self._archives.values():
                archive.close()
            self._archives.clear()
            folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class _Locked(Collector):
    """``collector``, collected while holding ``lock`` (the files do not change meanwhile)."""

    def __init__(self, collector: Any, lock: threading.Lock) -> None:
        self.collector, self.lock = collector, lock

    def collect(self) -> Iterable[Any]:
        with self.lock:
            return list(self.collector.collect())

    def describe(self) -> Iterator[Any]:
        return iter(())
