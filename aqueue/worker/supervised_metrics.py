"""One ``/metrics`` for ``worker --processes N --metrics-port PORT``: the parent serves what its children count.

prometheus_client's multiprocess mode does the adding up. The parent makes a private folder, starts
every child with ``PROMETHEUS_MULTIPROC_DIR`` naming it, and serves ``/metrics`` from a
``MultiProcessCollector`` reading it. Each child counts into files of its own there (memory-mapped, so
a value is in the file as soon as it is counted, even if the child is then killed outright). The files
of a child that exited stay, so counters and histograms keep what it counted when it is recycled or
killed and replaced; its gauges (``livesum``: active and prefetched tasks) are removed when the parent
sees it exit (``mark_process_dead``), so they add up the live children only. The parent removes the
folder when it exits.

Pushing values from the children to the parent over their socket was the other way: it loses what a
child counted since its last push when the child is killed, and needs a protocol of its own.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import suppress
from types import TracebackType
from typing import Self

from aqueue.worker.metrics import MetricsServer, multiprocess_registry

__all__ = ["SupervisedMetrics"]


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

    @property
    def environment(self) -> dict[str, str]:
        """What a child's environment needs so that it counts into the folder."""
        assert self.folder is not None, "not entered"
        return {"PROMETHEUS_MULTIPROC_DIR": self.folder}

    def process_exited(self, pid: int) -> None:
        """Forget the gauges of child ``pid``, which has exited (its counters and histograms stay)."""
        if self.folder is not None:
            from prometheus_client import multiprocess

            with suppress(OSError):  # removed already
                multiprocess.mark_process_dead(pid, self.folder)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        """Make the folder and start serving.

        Raises:
            ImproperlyConfigured: the port cannot be used.
        """
        self.folder = tempfile.mkdtemp(prefix="aqueue-metrics-")
        server = MetricsServer(multiprocess_registry(self.folder), self.port, self.address)
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

    def _remove_folder(self) -> None:
        folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
