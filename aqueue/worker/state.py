"""What a worker knows about itself: active requests, revoked ids (kept in --statedb), counters."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aqueue.message import Message

if TYPE_CHECKING:
    from aqueue.broker.base import Delivery

__all__ = ["WorkerState", "WorkerStatistics"]

logger = logging.getLogger("aqueue.worker")


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    active: int
    total: dict[str, int]
    revoked: int
    uptime: float


class WorkerState:
    """Per-worker bookkeeping; revoked ids survive restarts when a state file is given."""

    def __init__(self, statedb: str | Path | None = None) -> None:
        self.active: dict[str, tuple[Message, float, Delivery]] = {}
        """Running tasks by id: the message, when it started (Unix time) and its delivery."""
        self.total: Counter[str] = Counter()
        self.revoked: set[str] = set()
        self.started = time.monotonic()
        self.statedb = Path(statedb) if statedb else None
        self.load()

    def load(self) -> None:
        """Add the revoked ids kept in the state file (the processes of one worker share it)."""
        path = self.statedb
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            self.revoked.update(str(i) for i in data.get("revoked", []))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("Ignoring unreadable state file %s: %s", path, exc)

    def save(self) -> None:
        """Write the revoked ids, with those another process of the worker wrote meanwhile."""
        if self.statedb is not None:
            self.load()
            tmp = self.statedb.with_name(f"{self.statedb.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"revoked": sorted(self.revoked)}))
            tmp.replace(self.statedb)

    def revoke(self, task_ids: list[str]) -> None:
        self.revoked.update(task_ids)
        self.save()

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            len(self.active), dict(self.total), len(self.revoked), time.monotonic() - self.started
        )
