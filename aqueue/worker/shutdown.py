"""SIGTERM/SIGINT: the first asks the worker to stop gracefully; a second SIGINT stops at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["handle_signals"]

logger = logging.getLogger("aqueue.worker")


class Stoppable(Protocol):
    def request_stop(self) -> None: ...


@contextmanager
def handle_signals(worker: Stoppable, on_cold: Callable[[], None] | None = None) -> Iterator[None]:
    """Install the handlers on the running loop for the duration of the block.

    ``on_cold`` runs just before a second SIGINT ends the process (a supervisor kills its children).
    """
    loop = asyncio.get_running_loop()
    seen: set[int] = set()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and signum in seen:
            logger.warning("%s again: cold shutdown, running tasks are not waited for.", name)
            if on_cold is not None:
                on_cold()
            os._exit(1)
        seen.add(signum)
        logger.warning("%s received: warm shutdown (finishing running tasks).", name)
        worker.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
